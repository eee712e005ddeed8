"""Text features: the short-context encoder gives open_clip's features."""

from __future__ import annotations

import torch

from clipes.text import encode_text

from .conftest import make_tiny_openclip


def _check(model, tokenizer) -> None:
    prompts = ["a clean origami cat.", "a photo of the large person riding a bicycle down the road.", "x"]
    tokens = tokenizer(prompts)
    with torch.no_grad():
        full = model.encode_text(tokens)
        short = encode_text(model, tokens)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)


def test_short_context_equals_open_clips_encode_text(tiny_clip):
    _check(tiny_clip.model, tiny_clip.tokenizer)


def test_short_context_on_an_open_clip_model_with_eos_pooling():
    import open_clip

    model = make_tiny_openclip()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    _check(model, tokenizer)
    model.text_pool_type, model.text_eos_id = "eos", tokenizer.eot_token_id
    _check(model, tokenizer)
    model.text_pool_type = "last"  # no end-token pooling: encoded as open_clip does, whole context
    _check(model, tokenizer)
