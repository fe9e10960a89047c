"""The C++ headers restate r1kernels/constants.py; they must agree with it."""
import pathlib
import re

from r1kernels import constants

HEADERS = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "include" / "r1k"


def test_ignore_index_matches_cpp():
    text = (HEADERS / "softmax_stats.h").read_text()
    assert int(re.search(r"kIgnoreIndex\s*=\s*(-?\d+)", text).group(1)) == constants.IGNORE_INDEX


def test_advantage_scale_codes_match_cpp():
    text = (HEADERS / "group_stats.h").read_text()
    enum = dict(re.findall(r"kScale(\w+)\s*=\s*(\d+)", re.search(r"enum GroupScale[^}]*}", text).group(0)))
    assert {name.lower(): int(code) for name, code in enum.items()} == constants.SCALE_CODES


def test_group_rescale_matches_cpp():
    text = (HEADERS / "group_stats.h").read_text()
    for name, value in (("kGroupRescaleAbove", constants.GROUP_RESCALE_ABOVE),
                        ("kGroupRescale", constants.GROUP_RESCALE)):
        assert float.fromhex(re.search(rf"{name}\s*=\s*([0-9a-fx.p+-]+)", text).group(1)) == value, name
