"""The measured tile table's lookup (kernels/implicit_gemm.py): exact keys, batch sizes between
two tuned ones, and raw-operand GEMMs keeping keys of their own. The table itself is only read
on a GPU; here a stand-in table is installed."""
import json

import pytest
import torch

from fastdcgan.kernels import implicit_gemm as ig

GEOM = ig.make_geom(False, 2, 1, 16, 16, 8, 8)   # D's 16x16 -> 8x8 convolution


def _rows(batch):
    return batch * GEOM.mh * GEOM.mw


@pytest.fixture
def table(monkeypatch, tmp_path):
    """Installs {key: tile} as the tile table (as read from FASTDCGAN_TILES on a GPU)."""
    def install(entries):
        path = tmp_path / "tiles.json"
        path.write_text(json.dumps(entries))
        monkeypatch.setenv("FASTDCGAN_TILES", str(path))
        monkeypatch.setattr(ig, "INTERPRET", False)
        monkeypatch.setattr(ig, "_TILE_TABLE", None)
        monkeypatch.setattr(ig, "_BUCKETS", None)
        ig.tile_table()
    return install   # monkeypatch puts the real table back afterwards


def _key(batch, raw=False, kind="gemm", boxed=False):
    return ig.tile_key(kind, GEOM, 128, 256, _rows(batch), torch.bfloat16, raw, boxed)


def test_exact_key_and_between_tuned_batches(table):
    tile = [128, 256, 64, 8, 3]
    table({_key(128): tile, _key(512): tile, _key(512, kind="wgrad"): [128, 128, 32, 8, 4]})
    lookup = lambda batch, kind="gemm": ig._tuned_tile(  # noqa: E731
        kind, GEOM, 128, 256, _rows(batch), torch.bfloat16, False)
    assert lookup(128) == tile and lookup(512) == tile
    assert lookup(256) == tile               # the grouped pass's rows: both neighbours agree
    assert lookup(1024) is None              # nothing tuned above
    assert lookup(256, "wgrad") is None      # only one side tuned


def test_neighbours_that_disagree_give_no_tile(table):
    table({_key(128): [128, 256, 64, 8, 3], _key(512): [128, 128, 64, 4, 3]})
    assert ig._tuned_tile("gemm", GEOM, 128, 256, _rows(256), torch.bfloat16, False) is None


def test_raw_operand_gemms_have_keys_of_their_own(table):
    prologue, raw = [128, 256, 64, 8, 3], [128, 128, 64, 8, 4]
    table({_key(128): prologue, _key(128, raw=True): raw})
    assert _key(128, raw=True) != _key(128)
    assert ig._tuned_tile("gemm", GEOM, 128, 256, _rows(128), torch.bfloat16, False) == prologue
    assert ig._tuned_tile("gemm", GEOM, 128, 256, _rows(128), torch.bfloat16, True) == raw
    table({_key(128): prologue})
    assert ig._tuned_tile("gemm", GEOM, 128, 256, _rows(128), torch.bfloat16, True) is None


def test_boxed_gemms_take_their_own_tiles_first(table):
    """A raw-operand GEMM that may load TMA boxes (conv_gemm: FASTDCGAN_TMA=1 on an sm_90+
    device) takes the TMA sweep's tile (tune_gemm.py --feed tma), else the raw feed's; without
    boxes the boxed tiles are never read."""
    raw, boxed = [128, 128, 64, 8, 4], [128, 256, 64, 8, 3]
    table({_key(128, raw=True): raw, _key(128, raw=True, boxed=True): boxed})
    column_tile = lambda boxes: ig._gemm_tile(  # noqa: E731
        GEOM, 128, 256, _rows(128), torch.bfloat16, False, 0, boxes)[4][0][0]
    assert column_tile(False) == 128
    assert column_tile(True) == 256
    table({_key(128, raw=True): raw})
    assert column_tile(True) == 128
