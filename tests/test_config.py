import pytest

from tinypalm import Config, TinyPalmError


@pytest.mark.parametrize("name,billions,with_norms", [("palm-8b", 8.63, 8_632_012_800),
                                                      ("palm-62b", 62.50, 62_495_662_080),
                                                      ("palm-540b", 540.35, 540_356_474_880)])
def test_paper_presets_match_palm_table_1(name, billions, with_norms):
    cfg = Config.preset(name)
    assert round(cfg.n_params(include_norms=False) / 1e9, 2) == billions
    # every parameter, the n_layers + 1 LayerNorm gains (each d_model long) included
    assert cfg.n_params() == with_norms
    assert cfg.n_params() - cfg.n_params(include_norms=False) == (cfg.n_layers + 1) * cfg.d_model


def test_full_preset():
    cfg = Config.preset("full")
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.max_seq_len) == \
        (32768, 768, 12, 12, 1, 3072, 1024)
    assert round(cfg.n_params() / 1e6, 1) == 125.4


def test_n_params_counts_the_real_arrays():
    from tinypalm.model import param_shapes
    import math
    for name in ("tiny", "small"):
        cfg = Config.preset(name)
        assert cfg.n_params() == sum(math.prod(s) for s in param_shapes(cfg).values())


def test_defaults_and_overrides():
    cfg = Config(vocab_size=10, d_model=64, n_layers=1, n_heads=8)
    assert cfg.head_dim == 8 and cfg.d_ff == 256 and cfg.n_kv_heads == 1
    assert Config.preset("tiny", n_layers=5).n_layers == 5


@pytest.mark.parametrize("kwargs,words", [
    (dict(d_model=30, n_heads=4), "not divisible by n_heads"),
    (dict(d_model=32, n_heads=4, n_kv_heads=3), "not divisible by n_kv_heads"),
    (dict(d_model=36, n_heads=4), "head_dim must be an even integer of at least 2.*got 9"),
    (dict(d_model=32, n_heads=4, head_dim=7), "head_dim must be an even integer.*got 7"),
    (dict(d_model=32, n_heads=4, head_dim=0), "head_dim must be an even integer of at least 2.*got 0"),
    (dict(d_model=32, n_heads=4, head_dim=4.0), "head_dim must be an even integer.*got 4.0"),
    (dict(d_model=32, n_heads=4, d_ff=0), "d_ff must be a positive integer, got 0"),
    (dict(d_model=0, n_heads=4), "positive integer"),
    (dict(d_model=32, n_heads=4, rope_base=0.0), "rope_base must be a finite number, above 0"),
    (dict(d_model=32, n_heads=4, rope_base=float("inf")), "rope_base must be a finite number"),
    (dict(d_model=32, n_heads=4, norm_eps=0.0), "norm_eps must be a finite number, above 0"),
    (dict(d_model=32, n_heads=4, norm_eps=float("nan")), "norm_eps must be a finite number"),
    (dict(d_model=32, n_heads=4, z_loss=-1e-4), "z_loss must be a finite number, at least 0"),
])
def test_inconsistent_configs(kwargs, words):
    with pytest.raises(TinyPalmError, match=words):
        Config(vocab_size=10, n_layers=1, **kwargs)


def test_zero_z_loss_is_allowed():
    assert Config(vocab_size=10, d_model=32, n_layers=1, n_heads=4, z_loss=0.0).z_loss == 0.0


def test_unknown_preset():
    with pytest.raises(TinyPalmError, match="unknown preset 'huge'.*tiny, small, full"):
        Config.preset("huge")
