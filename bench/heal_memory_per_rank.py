"""The planner's heal-memory estimate per process for the shipped accelerate configs (no download).

Builds 3B- and 8B-class shapes from their public configs on the meta device (no weights), and
prints, for one GPU, DDP and FSDP full shard over N GPUs, the estimate of
``planner.heal_memory_bytes`` per process (the figure ``run --dry-run`` prints, with ``shards``
for FSDP). Settings: the 3B recipes' heal (batch 8 x 512 tokens, bf16 teacher, gradient
checkpointing) with ``train: neighbours`` and ``train: all``.

    python bench/heal_memory_per_rank.py [--gpus 2 4 8]
"""
from __future__ import annotations

import argparse

SHAPES = {  # name: (model_type, config, layers removed)
    "Qwen2.5-3B 36->28": ("qwen2", dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                                        num_key_value_heads=2, num_hidden_layers=36, vocab_size=151936,
                                        tie_word_embeddings=True), 8),
    "Llama-3.2-3B 28->22": ("llama", dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
                                          num_key_value_heads=8, num_hidden_layers=28, vocab_size=128256,
                                          tie_word_embeddings=True), 6),
    "Llama-3.1-8B 32->26": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                          num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256,
                                          tie_word_embeddings=False), 6),
}


def shape_of(model_type: str, config: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ollama_compress.planner import LAYER_INDEX, ModelShape

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    counts: dict[int, int] = {}
    other = 0
    for name, p in model.named_parameters():
        found = LAYER_INDEX.search(name)
        if found is None:
            other += p.numel()
        else:
            counts[int(found.group(1))] = counts.get(int(found.group(1)), 0) + p.numel()
    return ModelShape(tuple(counts[i] for i in sorted(counts)), other, config["hidden_size"], config["vocab_size"],
                      intermediate_size=config["intermediate_size"])


def main() -> None:
    from ollama_compress.planner import heal_memory_bytes
    from ollama_compress.recipe import Heal

    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    print("| model | train | one GPU / DDP (per GPU) | " + " | ".join(f"FSDP x{n} (per GPU)" for n in args.gpus) + " |")
    print("|---|---|---:|" + "---:|" * len(args.gpus))
    for name, (model_type, config, removed) in SHAPES.items():
        shape = shape_of(model_type, config)
        for train in ("neighbours", "all"):
            heal = Heal(batch_size=8, seq_len=512, train=train, gradient_checkpointing=True)

            def gib(shards: int, heal: Heal = heal) -> str:
                estimate = heal_memory_bytes(shape, removed, heal, device="cuda", autocast=True, shards=shards)
                return f"{estimate['total'] / 2**30:.1f} GiB"
            print(f"| {name} | {train} | {gib(1)} | " + " | ".join(gib(n) for n in args.gpus) + " |")


if __name__ == "__main__":
    main()
