import sys
from pathlib import Path

# The project is flat scripts at the repo root; make them importable from tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
