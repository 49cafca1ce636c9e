"""The ``ollama:`` source scheme: a model already in the user's Ollama, by name.

``source.model: ollama:NAME[:TAG]`` finds the model's GGUF blob through the Ollama server's API
(``/api/show`` names the blob in its Modelfile's FROM line) or, when no server answers, through
the manifest in the models directory (``$OLLAMA_MODELS`` or ``~/.ollama/models``). The blob's
sha256 must equal the digest in its name, and it goes through the GGUF verifier. A quantized
source carries its quantization error into everything made from it, which is said once.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from ollama_compress.errors import UserError
from ollama_compress.fsutil import file_sha256
from ollama_compress.hooks.registration import check_model_name, verify_gguf_file
from ollama_compress.hookspecs import hookimpl
from ollama_compress.hosts import normalize_host
from ollama_compress.ollama_server import default_models_dir, server_running
from ollama_compress.options import RunOptions
from ollama_compress.safe_read import read_json

MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
REGISTRY = "registry.ollama.ai"
UNQUANTIZED = ("F32", "F16", "BF16")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
BLOB_NAME = re.compile(r"sha256-[0-9a-f]{64}")


def split_name(name: str) -> tuple[str, str, str]:
    """``[host/][namespace/]model[:tag]`` -> (host, namespace/model, tag) with Ollama's defaults."""
    check_model_name(name)
    last = name.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else "latest"
    path = name[: len(name) - len(tag) - 1] if ":" in last else name
    parts = path.split("/")
    host = parts.pop(0) if len(parts) == 3 else REGISTRY
    namespace = parts.pop(0) if len(parts) == 2 else "library"
    return host, f"{namespace}/{parts[0]}", tag


def blob_from_server(name: str, host: str) -> Path | None:
    """The blob path in the Modelfile of ``name`` on the server at ``host``; None if none answers."""
    import ollama

    if not server_running(host):
        return None
    try:
        modelfile = ollama.Client(host=host).show(name).modelfile or ""
    except ollama.ResponseError as exc:
        raise UserError(f"ollama:{name} is not installed in the Ollama at {host} ({exc.error}); "
                        f"see 'ollama list', or 'ollama pull {name}'") from None
    for line in modelfile.splitlines():
        if line.startswith("FROM "):
            path = Path(line[5:].strip())
            if path.is_file():
                return path
    return None


def blob_from_manifest(name: str, models_dir: Path) -> Path:
    """The model blob named by ``name``'s manifest in ``models_dir``."""
    host, path, tag = split_name(name)
    manifest = models_dir / "manifests" / host / path / tag
    if not manifest.is_file():
        raise UserError(f"ollama:{name} is not installed in {models_dir} (no manifest {manifest}); "
                        f"see 'ollama list', or 'ollama pull {name}'")
    try:
        layers = read_json(manifest, "manifest", expect=dict)["layers"]
        digest = next(layer["digest"] for layer in layers
                      if isinstance(layer, dict) and layer.get("mediaType") == MODEL_MEDIA_TYPE)
        if not isinstance(digest, str):
            raise TypeError(digest)
    except (KeyError, TypeError, StopIteration):
        raise UserError(f"{manifest} is not an Ollama manifest with a model layer") from None
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise UserError(f"{manifest}: the model layer's digest {str(digest)[:80]!r} is not sha256:<64 hex digits>; "
                        "re-pull or re-create the model in Ollama")
    return models_dir / "blobs" / digest.replace(":", "-")


def check_blob(blob: Path) -> Path:
    """The blob if its sha256 (hashed on every read, never from a cache) equals the digest in its
    name and it is a complete GGUF."""
    if not BLOB_NAME.fullmatch(blob.name):
        raise UserError(f"{blob}: not an Ollama blob (sha256-<64 hex digits>); re-pull or re-create the model in Ollama")
    if not blob.is_file():
        raise UserError(f"{blob}: the model's blob is missing; re-pull or re-create the model in Ollama")
    expected = blob.name.removeprefix("sha256-")
    actual = file_sha256(blob)  # every time: a size+mtime cache would miss a blob rewritten in place
    if actual != expected:
        raise UserError(f"{blob}: its sha256 is {actual[:16]}..., not the {expected[:16]}... its name promises; "
                        "the blob is damaged: re-pull or re-create the model in Ollama")
    file_type = verify_gguf_file(blob)
    if file_type and file_type.upper() not in UNQUANTIZED:
        print(f"warning: {blob.name} is quantized ({file_type}); its quantization error carries into "
              "every model made from it (an F16 source is better)", file=sys.stderr)
    return blob


def resolve_ollama_model(name: str, options: RunOptions, host: str | None = None,
                         models_dir: Path | None = None) -> Path:
    """The verified GGUF blob of the Ollama model ``name``."""
    blob = blob_from_server(name, normalize_host(host))
    if blob is None:
        blob = blob_from_manifest(name, Path(models_dir) if models_dir else default_models_dir())
    return check_blob(blob)


@hookimpl
def register_sources(register):
    register("ollama", resolve_ollama_model,
             "a model already in your Ollama, by name (ollama:NAME[:TAG]); its GGUF blob is imported")
