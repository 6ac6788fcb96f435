#!/usr/bin/env python3
"""Does a LoRA adapter mean the same in Hugging Face PEFT as in firstrt?

Loads the base model in transformers from the GGUF file (its weights dequantised to float32, as
`firstrt run --dtype f32` does), applies each adapter folder with `peft.PeftModel.from_pretrained`,
and compares the logits of the last prompt position with `firstrt run --lora DIR --logits-out`.
The base model without an adapter is compared the same way first, as the control: it bounds the
difference that the two runtimes' float32 arithmetic alone makes, so an adapter whose difference
stays within that bound means the same to both, and one that goes past it does not (names, config
keys, scaling or a transposed or permuted factor would show here).

Run it with the environment that scripts/setup-peft.sh makes:
    "$(scripts/setup-peft.sh)" scripts/check-peft.py --firstrt target/release/firstrt DIR [DIR...]
Prints one JSON object (each case's max |difference| and the adapter's effect on the logits) and
exits 1 when an adapter differs by more than the tolerance, or when it changes the logits too
little for the comparison to tell anything.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile

import gguf
import numpy as np
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = os.path.join(
    os.environ.get("FIRSTRT_CACHE", os.path.expanduser("~/.cache/firstrt")), "SmolLM2-135M-Instruct.Q4_1.gguf"
)
DEFAULT_PROMPT = "name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate], near[Burger King]"


def firstrt_logits(firstrt, model, ids, adapter):
    """The last prompt position's logits, [vocab] float32, from `firstrt run --logits-out`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.safetensors")
        cmd = [firstrt, "run", "-m", model, "--dtype", "f32", "--prompt-ids", ",".join(map(str, ids))]
        cmd += ["--max-tokens", "1", "--temperature", "0", "--logits-out", out]
        if adapter is not None:
            cmd += ["--lora", adapter]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"check-peft: {' '.join(cmd)} failed:\n{done.stderr}")
        return load_file(out)["logits"].astype(np.float64)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("adapters", nargs="*", help="PEFT adapter folders (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--firstrt", required=True, help="the firstrt binary")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the GGUF model (default: the test model)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt, tokenised without special tokens")
    parser.add_argument("--tolerance", type=float, default=2e-3, help="max |logit difference| allowed over the base's")
    parser.add_argument("--min-effect", type=float, default=0.05, help="an adapter must move some logit by this much")
    args = parser.parse_args()
    torch.manual_seed(0)

    folder, name = os.path.split(os.path.abspath(args.model))
    # A GGUF without `output.weight` ties the LM head to the embedding (as llama.cpp and firstrt
    # read it); transformers leaves the head random unless told.
    tied = all(t.name != "output.weight" for t in gguf.GGUFReader(args.model).tensors)
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32, tie_word_embeddings=tied)
    base.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tokenizer(args.prompt, add_special_tokens=False).input_ids

    def hf_logits(model):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1].double().numpy()

    base_hf = hf_logits(base)
    base_diff = float(np.abs(firstrt_logits(args.firstrt, args.model, ids, None) - base_hf).max())
    report = {"model": args.model, "prompt_ids": ids, "base_max_diff": base_diff, "adapters": []}
    failed = base_diff > args.tolerance
    for adapter in args.adapters:
        # A fresh copy of the base for each adapter: PeftModel injects its layers in place.
        model = PeftModel.from_pretrained(copy.deepcopy(base), adapter)
        model.eval()
        peft_logits = hf_logits(model)
        diff = float(np.abs(firstrt_logits(args.firstrt, args.model, ids, adapter) - peft_logits).max())
        effect = float(np.abs(peft_logits - base_hf).max())
        ok = diff <= base_diff + args.tolerance and effect >= args.min_effect
        failed |= not ok
        report["adapters"].append({"dir": adapter, "max_diff": diff, "effect": effect, "ok": ok})
    print(json.dumps(report))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
