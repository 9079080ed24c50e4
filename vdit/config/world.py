"""The physics world's configuration and its colour table: data for the simulator
(vdit/data/physics.py), the config system and the tracker, kept below all three."""

from __future__ import annotations

from dataclasses import dataclass

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 245),
    "yellow": (240, 220, 40), "magenta": (220, 50, 220), "cyan": (40, 220, 230),
    "orange": (250, 140, 20), "white": (245, 245, 245),
}
GREY: tuple[int, int, int] = (128, 128, 128)  # occluders only; not a ball colour


@dataclass(frozen=True)
class WorldConfig:
    """The physics world. Lengths are fractions of the frame height, time is in seconds."""

    frames: int = 16
    height: int = 64
    width: int = 64
    fps: float = 8.0  # frame interval dt = 1/fps seconds
    substeps: int = 8  # integration substeps per frame
    min_balls: int = 1
    max_balls: int = 3
    radius_range: tuple[float, float] = (0.06, 0.14)  # fraction of frame height
    speed_range: tuple[float, float] = (0.2, 1.2)  # frame heights per second
    gravity: float = 2.0  # frame heights per second^2, pointing down (+y); 0 disables
    occluder_prob: float = 0.5  # chance a clip has one occluder bar
    colours: tuple[str, ...] = (
        "red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white"
    )
    background: tuple[int, int, int] = (16, 16, 24)
    # Colour-size coupling: (colour, min, max) pairs give that colour its own radius range
    # (fractions of height) instead of radius_range, so some colour-size combinations are never
    # seen in training (an out-of-distribution split for `vdit eval-physics`). Empty: none.
    colour_radius: tuple[tuple[str, float, float], ...] = ()

    def validate(self) -> list[str]:
        """Human-readable problems, each starting with the field name; empty when fine."""
        p: list[str] = []
        if self.frames < 1:
            p.append(f"frames: must be >= 1, got {self.frames}")
        for name in ("height", "width"):
            if getattr(self, name) < 8:
                p.append(f"{name}: must be >= 8 pixels, got {getattr(self, name)}")
        if not self.fps > 0:
            p.append(f"fps: must be > 0, got {self.fps}")
        if self.substeps < 1:
            p.append(f"substeps: must be >= 1, got {self.substeps}")
        if self.min_balls < 1:
            p.append(f"min_balls: must be >= 1, got {self.min_balls}")
        if not self.min_balls <= self.max_balls <= 8:
            p.append(f"max_balls: must be in [min_balls={self.min_balls}, 8], got {self.max_balls}")
        lo, hi = self.radius_range
        if not 0 < lo <= hi:
            p.append(f"radius_range: min must be > 0 and <= max, got {self.radius_range}")
        elif 2 * hi * self.height > min(self.height, self.width):
            p.append(f"radius_range: max {hi} gives a ball wider than the frame")
        if not 0 <= self.speed_range[0] <= self.speed_range[1]:
            p.append(f"speed_range: min must be >= 0 and <= max, got {self.speed_range}")
        if not self.gravity >= 0:
            p.append(f"gravity: must be >= 0, got {self.gravity}")
        if not 0 <= self.occluder_prob <= 1:
            p.append(f"occluder_prob: must be in [0, 1], got {self.occluder_prob}")
        if not self.colours:
            p.append("colours: must not be empty")
        for c in self.colours:
            if c not in PALETTE:
                p.append(f"colours: unknown colour {c!r}; allowed: {', '.join(PALETTE)}")
        for c, lo, hi in self.colour_radius:
            if c not in PALETTE:
                p.append(f"colour_radius: unknown colour {c!r}; allowed: {', '.join(PALETTE)}")
            if not 0 < lo <= hi or 2 * hi * self.height > min(self.height, self.width):
                p.append(f"colour_radius: {c} range ({lo}, {hi}) must have 0 < min <= max "
                         "and fit in the frame")
        if len(self.background) != 3 or any(not 0 <= v <= 255 for v in self.background):
            p.append(f"background: need three values in [0, 255], got {self.background}")
        return p


