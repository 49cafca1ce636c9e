"""The vocabulary keys (``tokenizer.ggml.*``): tokens, types, scores, merges, special ids, chat template.

Each tokenizer kind is written the way llama.cpp's ``convert_hf_to_gguf.py`` writes it, so a file
from here and one from the converter hold the same vocabulary.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

from ollama_compress.errors import UserError
from ollama_compress.modelio import load_tokenizer
from ollama_compress.options import RunOptions
from ollama_compress.templates import check_chat_template

from .arch import gguf_py

log = logging.getLogger(__name__)

# llama.cpp identifies a BPE pre-tokenizer by hashing the token ids of this text (the same string as
# convert_hf_to_gguf.py's get_vocab_base_pre, so the hashes below are comparable).
CHK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# Known hashes of the supported families' BPE tokenizers -> llama.cpp's pre-tokenizer name.
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Llama 3 variants
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
}
# When the hash is unknown (a retrained or edited tokenizer), the family's usual pre-tokenizer.
FAMILY_PRE = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe", "mistral": "tekken"}


@dataclass
class Vocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[Any]
    types: list[int]
    scores: list[float] | None = None
    notes: list[str] = field(default_factory=list)

    def approx_bytes(self, model_dir: Path) -> int:
        """Bytes the vocabulary takes in the GGUF (merges bounded by the tokenizer files' size)."""
        files = sum((model_dir / n).stat().st_size for n in ("tokenizer.json", "merges.txt") if (model_dir / n).is_file())
        return sum(len(t) + 16 for t in self.tokens) + files


def bpe_pre_name(tokenizer, model_type: str) -> tuple[str, str | None]:
    """(pre-tokenizer name, note) by llama.cpp's hash rule, with a family fallback (noted)."""
    ids = tokenizer.encode(CHK_TEXT)
    digest = sha256(str(ids).encode()).hexdigest()
    if digest in KNOWN_PRE:
        return KNOWN_PRE[digest], None
    pre = FAMILY_PRE.get(model_type, "default")
    return pre, (f"unknown BPE pre-tokenizer (hash {digest[:12]}); using '{pre}', the usual one for "
                 f"{model_type}: check that llama.cpp tokenizes like transformers")


def _bpe_vocab(tokenizer, n_vocab: int, model_type: str) -> Vocab:
    gguf = gguf_py()
    T = gguf.TokenType
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the embedding has only {n_vocab} rows")
    by_id = {i: tok for tok, i in vocab.items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        token = by_id[i]
        if i in added:
            entry = added[i]
            if not entry.normalized:  # llama.cpp expects added tokens in their normalized form
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if entry.special or _looks_special(token):
                types.append(T.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(T.USER_DEFINED)
        else:
            types.append(T.NORMAL)
        tokens.append(token)
    pre, note = bpe_pre_name(tokenizer, model_type)
    return Vocab("gpt2", pre, tokens, types, notes=[note] if note else [])


# Added tokens llama.cpp's converter types CONTROL even when the tokenizer does not call them special.
_SPECIAL_LOOKING = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def _looks_special(token: str) -> bool:
    return token in _SPECIAL_LOOKING or (token.startswith("<|") and token.endswith("|>")) or \
        (token.startswith("<\uff5c") and token.endswith("\uff5c>")) or \
        (token.startswith("<unused") and token.endswith(">"))


def _spm_vocab(model_dir: Path, n_vocab: int, model_type: str) -> Vocab:
    """SentencePiece pieces with their own scores and types, then the added tokens over them.

    As the converter writes it: ids past the pieces are ``[PADi]`` with score -10000, and each
    added token gets score -1000 (a piece the tokenizer also lists as added is overwritten).
    """
    from sentencepiece import SentencePieceProcessor

    T = gguf_py().TokenType
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    if sp.vocab_size() > n_vocab:
        raise UserError(f"tokenizer.model has {sp.vocab_size()} pieces but the embedding has only {n_vocab} rows")
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(T.UNUSED)] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = int(T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i)
                       else T.UNUSED if sp.IsUnused(i) else T.BYTE if sp.IsByte(i) else T.NORMAL)
    for i, text, kind in _spm_added_tokens(model_dir, model_type):
        if i < n_vocab:
            tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, int(kind)
    return Vocab("llama", "default", tokens, types, scores=scores)


def _spm_added_tokens(model_dir: Path, model_type: str) -> list[tuple[int, str, Any]]:
    """(id, text, type) of the added tokens, in the order the converter applies them.

    Every family reads ``added_tokens.json`` (user-defined) and ``tokenizer_config.json``'s
    ``added_tokens_decoder`` (control when special or special-looking, else user-defined with
    spaces pre-normalized); phi3 types by the ``special`` flag alone and also reads ``tokenizer.json``.
    """
    T = gguf_py().TokenType
    out: list[tuple[int, str, Any]] = [(int(i), text, T.USER_DEFINED)
                                       for text, i in _read_json(model_dir / "added_tokens.json").items()]
    decoder = _read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
    entries = [(int(i), e) for i, e in decoder.items()]
    if model_type == "phi3":
        entries += [(int(e["id"]), e) for e in _read_json(model_dir / "tokenizer.json").get("added_tokens", [])]
        return out + [(i, e["content"], T.CONTROL if e.get("special") else T.USER_DEFINED) for i, e in entries]
    for i, entry in entries:
        text = entry["content"]
        if entry.get("special") or _looks_special(text):
            out.append((i, text, T.CONTROL))
        else:
            out.append((i, text.replace("\u2581", " "), T.USER_DEFINED))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _hf_spm_vocab(model_dir: Path, n_vocab: int) -> Vocab:
    """A SentencePiece-style BPE that only exists as tokenizer.json (byte_fallback BPE)."""
    gguf = gguf_py()
    hf = gguf.LlamaHfVocab(model_dir)
    tokens, scores, types = [], [], []
    for text, score, kind in hf.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))
    if len(tokens) > n_vocab:
        raise UserError(f"the tokenizer has {len(tokens)} tokens but the embedding has only {n_vocab} rows")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return Vocab("llama", "default", tokens, types, scores=scores)


def _tokenizer_kind(model_dir: Path, tokenizer=None) -> str:
    """"spm" (tokenizer.model), "hf_spm" (byte-fallback BPE in tokenizer.json) or "bpe" (byte-level BPE)."""
    if (model_dir / "tokenizer.model").is_file():
        return "spm"
    tok_file = model_dir / "tokenizer.json"
    if tok_file.is_file():
        model = _tokenizer_model(tok_file, tokenizer)
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            return "hf_spm"
        if model.get("type") == "BPE":
            return "bpe"
        raise UserError(f"{tok_file}: tokenizer model '{model.get('type')}' is not supported for GGUF export")
    if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        return "bpe"
    raise UserError(f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model); copy it from the source model")


def _tokenizer_model(tok_file: Path, tokenizer) -> dict[str, Any]:
    """The type and byte_fallback of tokenizer.json's model, from the loaded tokenizer when there is one
    (tokenizer.json of a large vocabulary takes a while to parse again)."""
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if model is not None:
        return {"type": type(model).__name__, "byte_fallback": bool(getattr(model, "byte_fallback", False))}
    return json.loads(tok_file.read_text(encoding="utf-8")).get("model", {})


def build_vocab(model_dir: Path, model_type: str, n_vocab: int, tokenizer=None) -> Vocab:
    """The GGUF vocabulary of ``model_dir``, padded to the embedding's ``n_vocab`` rows."""
    kind = _tokenizer_kind(model_dir, tokenizer)
    if kind == "spm":
        return _spm_vocab(model_dir, n_vocab, model_type)
    if kind == "hf_spm":
        return _hf_spm_vocab(model_dir, n_vocab)
    if tokenizer is None:
        raise UserError(f"cannot load the tokenizer of {model_dir}")
    return _bpe_vocab(tokenizer, n_vocab, model_type)


def load_tokenizer_or_none(model_dir: Path, options: RunOptions):
    try:
        return load_tokenizer(model_dir, options)
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        log.warning("cannot load the tokenizer of %s with transformers: %s", model_dir, exc)
        return None


def write_vocab(w, vocab: Vocab, model_dir: Path, tokenizer, model_type: str) -> None:
    """Tokens, merges, special ids, add_bos/add_eos and chat template."""
    gguf = gguf_py()
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if model_type.startswith("gemma") and vocab.model == "llama":
        w.add_add_space_prefix(False)
    elif model_type in ("llama", "mistral"):  # the converter's llama family copies the tokenizer's choice
        prefix = _read_json(model_dir / "tokenizer_config.json").get("add_prefix_space")
        if prefix is not None:
            w.add_add_space_prefix(bool(prefix))
    special = gguf.SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    _fill_special_from_tokenizer(special, tokenizer, len(vocab.tokens))
    special.add_to_gguf(w, quiet=True)


def _fill_special_from_tokenizer(special, tokenizer, n_vocab: int) -> None:
    """Special ids and whether BOS/EOS are added, as the transformers tokenizer actually behaves."""
    if tokenizer is None:
        return
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            special.special_token_ids[kind] = tid
    probe = "Hello world"
    with_special = tokenizer(probe)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    extra = len(with_special) > len(bare)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token["bos"] = bool(extra and bos is not None and with_special[0] == bos)
    adds_eos = bool(extra and eos is not None and with_special[-1] == eos)
    if adds_eos or "eos" in special.add_special_token:  # absent means no EOS to llama.cpp, as the converter leaves it
        special.add_special_token["eos"] = adds_eos
    if special.chat_template is None and isinstance(getattr(tokenizer, "chat_template", None), str):
        special.chat_template = tokenizer.chat_template
    if isinstance(special.chat_template, str):
        check_chat_template(special.chat_template)  # never written into a GGUF unchecked

