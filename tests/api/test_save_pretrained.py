"""Saving what optimize returns (issue 15): a diffusers pipeline whose transformer is a DraftOptimizedModule
writes the original transformer (class, config, weights), and so do the wrapper's own save_pretrained and
state_dict. diffusers finds the model behind a compiled one by torch.compile's OptimizedModule and its
``_orig_mod``; the wrapper used to be registered as ("draftopt.api", "DraftOptimizedModule") and dropped on
save (``"transformer": [null, null]`` in model_index.json)."""

import copy
import json

import pytest
import torch

import draftopt

from ..helpers import CPU_OPTIONS
from ..models import tiny_wan

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def tiny_wan_pipeline():
    """A WanPipeline of tiny random components, built offline: the tokenizer is a word-level one made in memory
    (a UMT5/T5 tokenizer needs its files from the Hub)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                           attn_scales=[]).eval()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=16, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                               relative_attention_num_buckets=8)).eval()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")),
        pad_token="<pad>", unk_token="<unk>")
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(), transformer=tiny_wan())


def assert_same_weights(model, original):
    got, want = model.state_dict(), original.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


def public_config(model) -> dict:
    """The model's config without diffusers' bookkeeping (``_name_or_path``, ...); tuples as lists, as JSON has."""
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def test_pipeline_saves_the_original_transformer(tmp_path):
    from diffusers import WanPipeline, WanTransformer3DModel

    pipe = tiny_wan_pipeline()
    original = pipe.transformer
    pipe.transformer = draftopt.optimize(original, sparsity=0.5, **CPU_OPTIONS)
    assert tuple(pipe.config.transformer) == ("diffusers", "WanTransformer3DModel")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert (tmp_path / "transformer" / "config.json").exists()

    reloaded = WanPipeline.from_pretrained(tmp_path)
    assert type(reloaded.transformer) is WanTransformer3DModel
    assert public_config(reloaded.transformer) == public_config(original)
    assert_same_weights(reloaded.transformer, original)
    # from_pretrained checks the class of a component it is given: an optimized one passes as the original class
    again = WanPipeline.from_pretrained(tmp_path, transformer=draftopt.optimize(reloaded.transformer, **CPU_OPTIONS))
    assert isinstance(again.transformer, draftopt.DraftOptimizedModule)
    assert tuple(again.config.transformer) == ("diffusers", "WanTransformer3DModel")


def test_optimized_model_saves_the_original_weights(tmp_path):
    from diffusers import WanTransformer3DModel

    wan = tiny_wan()
    optimized = draftopt.optimize(wan, sparsity=0.5, **CPU_OPTIONS)
    optimized.save_pretrained(tmp_path)  # diffusers' own, on the original model
    loaded = WanTransformer3DModel.from_pretrained(tmp_path)
    assert public_config(loaded) == public_config(wan)
    assert_same_weights(loaded, wan)
    # state_dict: the original model's tensors themselves, under "_orig_mod." (as torch.compile's wrapper has them)
    state, want = optimized.state_dict(), wan.state_dict()
    assert state.keys() == {f"_orig_mod.{k}" for k in want}
    assert all(state[f"_orig_mod.{k}"].data_ptr() == v.data_ptr() for k, v in want.items())
    other = draftopt.optimize(tiny_wan(), **CPU_OPTIONS)
    other.load_state_dict(state)
    assert_same_weights(other._orig_mod, wan)


def test_wrapper_is_a_compiled_module_to_other_libraries_only():
    """It passes as torch.compile's OptimizedModule (how diffusers, accelerate and torch.distributed.checkpoint
    find the original model), and otherwise keeps nn.Module's behaviour, not OptimizedModule's."""
    from diffusers.utils.torch_utils import is_compiled_module, unwrap_module

    wan = tiny_wan()
    optimized = draftopt.optimize(wan, **CPU_OPTIONS)
    assert is_compiled_module(optimized) and unwrap_module(optimized) is wan
    optimized.note = "mine"  # attribute writes stay on the wrapper (OptimizedModule forwards them to the model)
    assert optimized.__dict__["note"] == "mine" and not hasattr(wan, "note")
    assert bool(optimized)  # OptimizedModule's bool() goes through len(), which a model without __len__ raises
    optimized.eval()
    assert not optimized.training and not wan.training
    assert repr(optimized).startswith("DraftOptimizedModule(")
    twin = copy.deepcopy(optimized)
    assert isinstance(twin, draftopt.DraftOptimizedModule) and twin._orig_mod is not wan
    assert_same_weights(twin._orig_mod, wan)
