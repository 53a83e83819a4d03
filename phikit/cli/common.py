"""Flags several subcommands share, and loading a model from them: defined once."""

from __future__ import annotations

import argparse
import sys

from phikit.checkpoint import DEFAULT_MODEL, hub_id_shaped
from phikit.quantize import FORMATS as QUANTIZE  # --quantize's choices
from phikit.quantize import GROUP_SIZE, GROUP_SIZES

EPILOG = (
    "Models: a local folder (config.json + *.safetensors) or a Hugging Face Hub id such as microsoft/phi-2 or "
    "microsoft/Phi-4-mini-instruct (Phi-1/1.5/2 and the Phi-3 family: Phi-3, Phi-3.5, Phi-4, Phi-4-mini)."
)


DTYPES = ("auto", "bf16", "fp16", "fp32")  # --dtype's choices


def add_model_args(
    p: argparse.ArgumentParser,
    quantize: bool = True,
    adapter: str | None = None,
    device: bool = True,
    kv_cache: bool = False,
    takes_adapter: bool = False,
) -> None:
    """The model flags: --model, --dtype, --device, and where the command takes them --quantize and
    --group-size (``quantize``), --adapter (``adapter``: its help text) and --kv-cache (``kv_cache``: it
    decodes)."""
    add_model_arg(p, adapter=bool(adapter) or takes_adapter)  # takes_adapter: the command adds its own --adapter
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="weight/compute dtype (default auto: bf16, or fp16 on GPUs without bf16)",
    )
    if device:
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: GPU if present)")
    if quantize:
        p.add_argument(
            "--quantize",
            choices=QUANTIZE,
            help="quantize linear layers while loading: int8 (per channel), int4 (per group), nf4 "
            "(QLoRA's 4-bit; bitsandbytes on CUDA); a checkpoint from 'phikit quantize' needs none",
        )
        add_group_size_arg(p)
    if adapter:
        p.add_argument("--adapter", "-a", metavar="DIR", help=adapter)
    if kv_cache:
        add_kv_cache_arg(p)


def add_kv_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-cache",
        default="auto",
        choices=["auto", "fp16", "int8"],
        help="the KV cache's element type: auto (fp16 on a CPU with phikit's kernels, else the compute dtype), "
        "fp16, or int8 (a scale per token and head: about half fp16's memory and what a long context reads "
        "each token; greedy output may differ slightly)",
    )


def add_model_arg(p: argparse.ArgumentParser, what: str = "model", adapter: bool = False) -> None:
    """--model; left out, ``default_model`` fills it in once the flags are parsed (``adapter``: the command
    takes --adapter, whose base model is then the default)."""
    default = (
        f"the base model an --adapter names in its adapter_config.json, else {DEFAULT_MODEL}"
        if adapter
        else DEFAULT_MODEL
    )
    p.add_argument("--model", "-m", help=f"{what} folder or Hub id (default: {default})")


def adapter_folders(args: argparse.Namespace) -> list[str]:
    """The adapter folders the flags name: --adapter DIR, or serve's repeatable [NAME=]DIR."""
    given = getattr(args, "adapter", None)
    if not given:
        return []
    if isinstance(given, str):
        return [given]
    return [a.split("=", 1)[1] if "=" in a else a for a in given]


def default_model(args: argparse.Namespace) -> None:
    """--model left out: the base model the first --adapter records (PEFT's ``base_model_name_or_path``, which
    phikit's fine-tuning writes as an absolute path for a local folder), else DEFAULT_MODEL. Said on stderr."""
    import json
    from pathlib import Path

    from phikit.errors import PhikitError

    if not hasattr(args, "model") or args.model is not None:
        return
    args.model = DEFAULT_MODEL
    for folder in adapter_folders(args):
        try:
            base = json.loads((Path(folder) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue  # a missing or broken adapter is reported where it is loaded
        if not isinstance(base, str) or not base.strip():
            continue
        text = base.strip()
        if not Path(text).expanduser().exists() and not hub_id_shaped(text):
            raise PhikitError(
                f"{folder}/adapter_config.json names base model {text}, which is not here; give --model (its "
                "folder or Hub id)"
            )
        args.model = text
        print(
            f"phikit: base model {text} (from {folder}/adapter_config.json; --model chooses another)", file=sys.stderr
        )
        return


def add_group_size_arg(p: argparse.ArgumentParser) -> None:
    # left out: GROUP_SIZE; given with another format than int4 it is refused (check_group_size)
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, help=f"int4 group size (default {GROUP_SIZE})")


def check_group_size(args: argparse.Namespace, fmt: str | None) -> int:
    """--group-size (GROUP_SIZE when left out); given for a format other than int4 (``fmt``), a one-line error: it
    would change nothing."""
    from phikit.errors import PhikitError

    fmt = fmt if fmt is None or isinstance(fmt, str) else fmt.format  # a QuantSpec: its format
    size = getattr(args, "group_size", None)
    if size is not None and fmt != "int4":
        raise PhikitError(
            f"--group-size {size} is int4's; with {fmt or 'no quantization'} it changes nothing: drop it, or "
            "quantize to int4"
        )
    return size or GROUP_SIZE


def load_model(args: argparse.Namespace, progress: bool = True, **changes):
    """``phikit.load`` from the model flags (``changes`` override them: model, adapter, quantize, ...)."""
    from phikit.api import load

    options = {
        "model": args.model,
        "dtype": args.dtype,
        "device": getattr(args, "device", "auto"),
        "quantize": getattr(args, "quantize", None),
        "group_size": changes.pop("group_size", None)
        or check_group_size(args, changes.get("quantize", getattr(args, "quantize", None))),
        "adapter": getattr(args, "adapter", None),
        "kv_cache": getattr(args, "kv_cache", "auto"),
    }
    options.update(changes)
    if options["quantize"] != "int4":  # a column or row of another format than int4 (eval's, bench's) has none
        options["group_size"] = None
    return load(options.pop("model"), progress=progress, **options)


def input_file(path, flag: str):
    """``path`` as a file to read for ``flag``: a missing one or a folder is a one-line error saying which."""
    from pathlib import Path

    from phikit.errors import PhikitError

    path = Path(path)
    if path.is_dir():
        raise PhikitError(f"{flag} {path}: is a directory, not a file")
    if not path.is_file():
        raise PhikitError(f"{flag} {path}: file not found")
    return path


def output_file(path, flag: str):
    """``path`` as a file to write for ``flag``: never a folder, and somewhere this user can write."""
    from pathlib import Path

    from phikit.checkpoint import check_writable
    from phikit.errors import PhikitError

    path = Path(path)
    if path.is_dir():
        raise PhikitError(f"{flag} {path}: is a directory; give a file name")
    return check_writable(path, flag)


def size_text(nbytes: float) -> str:
    """A file's size for a person: "35.2 MB" under a gigabyte, "2.15 GB" above."""
    return f"{nbytes / 1e6:.1f} MB" if nbytes < 1e9 else f"{nbytes / 1e9:.2f} GB"


def check_generation(config) -> None:
    """``config.validate()`` (a GenerationConfig), its errors naming the flags (--top-p), not the fields (top_p)."""
    from phikit.errors import PhikitError

    if any(stop == "" for stop in getattr(config, "stop", None) or []):
        raise PhikitError("--stop: an empty string would stop before the first token; give the text to stop at")
    try:
        config.validate()
    except PhikitError as e:
        field, _, rest = str(e).partition(" ")
        if field not in config.__dataclass_fields__:
            raise
        raise PhikitError(f"--{field.replace('_', '-')} {rest}") from None


def at_least(value, minimum: int, flag: str):
    """``value`` (or None) is at least ``minimum``, else a one-line error naming ``flag``."""
    from phikit.errors import PhikitError

    if value is not None and value < minimum:
        raise PhikitError(f"{flag} {value}: must be at least {minimum}")
    return value


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--template",
        "-t",
        default="raw",
        help="prompt template: raw, chat (the checkpoint's own chat template: Phi-3, Phi-3.5, Phi-4, "
        "Phi-4-mini), auto (chat where the checkpoint has one, else guanaco), instruct ('Instruct: "
        "{prompt}\\nOutput:'), guanaco ('### Human: {prompt}### Assistant:') or your own string with {prompt} "
        "(default raw: the prompt as it is)",
    )
    p.add_argument("--max-new-tokens", "-n", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when TEXT appears (repeatable); the template's turn markers always stop",
    )
    p.add_argument(
        "--prompt-lookup",
        action="store_true",
        help="speculative decoding with drafts copied from earlier text (greedy only; same output)",
    )
    p.add_argument(
        "--draft-model",
        metavar="M",
        help="speculative decoding with a smaller model sharing the tokenizer, e.g. microsoft/phi-1_5 "
        "for Phi-2 (greedy only; same output)",
    )
    p.add_argument("--draft-tokens", type=int, default=5, help="tokens drafted per speculative step (1-7, default 5)")
    p.add_argument(
        "--truncate",
        action="store_true",
        help="keep the last tokens of a prompt too long for the context instead of failing",
    )
