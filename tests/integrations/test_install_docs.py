"""The verl install line (docs/API.md and the ImportError hint) names what verl 0.9.1 needs to import and pins
(issue 24: orjson was missing). Runs without verl."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_verl_install_line_names_needs_and_pins():
    api = (ROOT / "docs" / "API.md").read_text()
    line = "pip install --no-deps verl==0.9.1 && pip install ray 'tensordict<=0.10.0' omegaconf hydra-core codetiming"
    assert line in " ".join(api.split())
    for need in ("orjson", "< 5.11", "<= 0.10.0", "datasets", "pillow"):
        assert need in api, need
    hint = (ROOT / "fastpmd" / "integrations" / "verl.py").read_text()
    assert "'tensordict<=0.10.0' omegaconf hydra-core codetiming orjson" in hint
