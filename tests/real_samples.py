"""Where the tests find the real log samples of shared/real (read-only, not part of the repo)."""
from pathlib import Path

# ../shared/real beside the checkout, as CI lays it out; else the workplace's copy.
CANDIDATES = [Path(__file__).resolve().parent.parent.parent / 'shared' / 'real', Path('/work/shared/real')]
REAL_DIR = next((p for p in CANDIDATES if p.is_dir()), CANDIDATES[0])


def real_sample(name: str) -> Path:
    """Path of a file in shared/real; a missing sample makes the tests that read it fail naming this path."""
    return REAL_DIR / name
