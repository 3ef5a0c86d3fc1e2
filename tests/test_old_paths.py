"""Every module path of the layout before the move still imports and gives the new module's
objects (megatron_mom/_moved.py; the table is docs/api.md's)."""
import importlib
import pickle
import subprocess
import sys

import pytest

# old path -> new path, written out here rather than read from _moved.MOVED
MOVED_MODULES = {
    "megatron_mom.mixer": "megatron_mom.layer.mixer",
    "megatron_mom.router": "megatron_mom.layer.router",
    "megatron_mom.packing": "megatron_mom.layer.packing",
    "megatron_mom.parallel": "megatron_mom.layer.parallel",
    "megatron_mom.specs": "megatron_mom.layer.specs",
    "megatron_mom.attention": "megatron_mom.layer.attention",
    "megatron_mom.projection": "megatron_mom.layer.projection",
    "megatron_mom.metrics": "megatron_mom.layer.metrics",
    "megatron_mom.mqar": "megatron_mom.apps.mqar",
    "megatron_mom.mqar_sweep": "megatron_mom.apps.mqar_sweep",
    "megatron_mom.text_compare": "megatron_mom.apps.text_compare",
    "megatron_mom.convert": "megatron_mom.apps.convert",
    "megatron_mom.hf": "megatron_mom.apps.hf",
    "megatron_mom.hf_checkpoint": "megatron_mom.apps.hf_checkpoint",
    "megatron_mom.cli": "megatron_mom.apps.cli",
    "megatron_mom.cli.main": "megatron_mom.apps.cli.main",
    "megatron_mom.megatron_lm": "megatron_mom.integrations.megatron_lm",
    "megatron_mom.megatron_lm.args": "megatron_mom.integrations.megatron_lm.args",
    "megatron_mom.megatron_lm.hooks": "megatron_mom.integrations.megatron_lm.hooks",
    "megatron_mom.megatron_lm.launch": "megatron_mom.integrations.megatron_lm.launch",
    "megatron_mom.megatron_lm.presets": "megatron_mom.integrations.megatron_lm.presets",
    "megatron_mom.cpu": "megatron_mom.testing.cpu",
}


@pytest.mark.parametrize("old,new", sorted(MOVED_MODULES.items()))
def test_old_path_is_the_new_module(old, new):
    old_module = importlib.import_module(old)
    new_module = importlib.import_module(new)
    assert old_module is new_module
    # the shared module keeps naming its own file and path (pickling, `python -m`, spawn)
    assert new_module.__name__ == new and new_module.__spec__.name == new


def test_old_paths_in_from_imports_and_attributes():
    import megatron_mom
    from megatron_mom import cpu, metrics, mixer, specs
    from megatron_mom.layer import metrics as new_metrics, mixer as new_mixer, specs as new_specs
    from megatron_mom.megatron_lm.presets import mom
    from megatron_mom.integrations.megatron_lm.presets import mom as new_mom
    from megatron_mom.mixer import MixtureOfMemories
    from megatron_mom.testing import cpu as new_cpu
    assert (mixer, specs, metrics, cpu) == (new_mixer, new_specs, new_metrics, new_cpu)
    assert mom is new_mom
    assert MixtureOfMemories is new_mixer.MixtureOfMemories is megatron_mom.MixtureOfMemories
    assert megatron_mom.mqar is importlib.import_module("megatron_mom.apps.mqar")
    # a submodule of a moved package is loaded once, not a second time under its old name
    assert sys.modules["megatron_mom.megatron_lm.presets"] is sys.modules[
        "megatron_mom.integrations.megatron_lm.presets"]


def test_old_inference_path_offers_the_cache_and_model_decoding():
    from megatron_mom.inference import MoMCache, from_segments, generate, layer_cache, sample
    from megatron_mom.layer import inference
    from megatron_mom.train import decoding
    assert (MoMCache, layer_cache, from_segments) == (inference.MoMCache, inference.layer_cache,
                                                       inference.from_segments)
    assert (generate, sample) == (decoding.generate, decoding.sample)
    assert not hasattr(inference, "generate")        # the layer no longer decodes models
    import megatron_mom.inference as old
    with pytest.raises(AttributeError, match="no_such_name"):
        old.no_such_name


def test_objects_pickled_by_old_path_load():
    from megatron_mom.layer.projection import in_proj_sections
    # a pickle written before the move names the function by its old module (protocol 0:
    # names as newline-ended text, so the bytes can be edited)
    old_pickle = pickle.dumps(in_proj_sections, protocol=0).replace(
        b"megatron_mom.layer.projection", b"megatron_mom.projection")
    assert b"megatron_mom.projection" in old_pickle
    assert pickle.loads(old_pickle) is in_proj_sections


def test_python_dash_m_old_path_runs_the_new_module():
    out = subprocess.run([sys.executable, "-m", "megatron_mom.cli.main", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout and "mqar" in out.stdout


def test_unknown_names_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("megatron_mom.no_such_module")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("megatron_mom.megatron_lm.no_such_module")
