import numpy as np
import pytest

from vdit.data.video_io import read_video, tile, upscale, write_gif, write_mp4


def _moving_square(t=6, h=32, w=48):
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, 8:20, 4 + 4 * i: 16 + 4 * i] = (220, 40, 40)
    return frames


def test_mp4_round_trip_keeps_frames_close(tmp_path):
    frames = _moving_square()
    path = write_mp4(tmp_path / "a.mp4", frames, fps=8, metadata={"comment": "hello"})
    back, fps = read_video(path)
    assert back.shape == frames.shape and fps == pytest.approx(8)
    assert np.abs(back.astype(int) - frames).mean() < 4
    assert not list(tmp_path.glob("*.part"))


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 7, 8, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "f.mp4", np.zeros((2, 8, 8, 3), np.float32), fps=8)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="cannot decode"):
        read_video(junk)


def test_gif_grid(tmp_path):
    from PIL import Image

    videos = np.stack([_moving_square(), 255 - _moving_square(), _moving_square()])
    grid = tile(upscale(videos.reshape(-1, 32, 48, 3), 2).reshape(3, 6, 64, 96, 3), columns=2)
    assert grid.shape == (6, 2 * 64 + 2, 2 * 96 + 2, 3)
    path = write_gif(tmp_path / "g.gif", grid, fps=8)
    with Image.open(path) as im:
        assert im.n_frames == 6 and im.size == (194, 130)
