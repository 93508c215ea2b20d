"""Build a tiny random-weight Llama that vLLM can serve, without touching the network.

    HF_HUB_OFFLINE=1 <engine python> tools/make_tiny_model.py OUTDIR

Run it with the engine environment's interpreter (it needs torch, tokenizers and
transformers). The model is for plumbing tests only: the weights are random, so the text
it writes is noise, but everything around it (tokenizer, chat template, generation
config, safetensors) is real. The shapes keep vLLM's CPU attention happy: it accepts
head sizes 32, 64, 80, ... only, so head_dim is 64 (hidden 128 over 2 heads).

OUTDIR is written through a temporary sibling directory and renamed into place, so an
interrupted run never leaves something that looks like a model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

VOCAB_SIZE = 4096
SEED = 20261127
# Enough text for 4096 merges; reading the whole stdlib would only cost time.
TRAINING_TEXT_LIMIT_BYTES = 6 * 1024 * 1024
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def training_files(limit_bytes: int = TRAINING_TEXT_LIMIT_BYTES) -> list[str]:
    """The interpreter's own standard library sources, in a stable order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        size = path.stat().st_size
        if total + size > limit_bytes:
            break
        chosen.append(str(path))
        total += size
    if not chosen:
        raise SystemExit(f"make_tiny_model: no *.py files under {stdlib} to train a tokenizer on")
    return chosen


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train(training_files(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(vocab_size=len(tokenizer), **MODEL_SHAPE, **ids)
    model = LlamaForCausalLM(config).to(torch.float32)
    generation = GenerationConfig(**ids, do_sample=False, max_new_tokens=64)
    return model, generation


def write_model(outdir: Path) -> None:
    outdir = outdir.resolve()
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.tmp.", dir=outdir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the engine may run as another user
    try:
        tokenizer = build_tokenizer()
        model, generation = build_model(tokenizer)
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        summary = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer),
            **MODEL_SHAPE,
        }
        (tmp / "tiny_model.json").write_text(json.dumps(summary, indent=2) + "\n")
        if outdir.exists():
            shutil.rmtree(outdir)
        os.replace(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, help="where the model directory goes")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    write_model(args.outdir)
    print(args.outdir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
