"""Files shipped with the package: chat template, safety sets, the default speedrun recipe."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def read_asset_text(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")
