"""A1111's "parameters" text, the de-facto standard every UI and image site reads back.

Layout (our own implementation of the published format):

    <prompt, with <lora:name:strength> tags>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: DDIM, CFG scale: 5, Seed: 123, Size: 32x32, Model hash: 0123abcd45, Model: base,
    Lora hashes: "a: 0123abcd4567"

The last line is `key: value` pairs joined by ", "; a value containing a comma, colon or newline is written
as a JSON string so it parses back unambiguously.

What A1111 reads back from it: "Model hash" is its checkpoint short hash (the first 10 hex digits of the sha256
of the whole file, `spo.formats.metadata.a1111_model_hash`), by which it switches to the right checkpoint; there is
none for a diffusers folder or a built-in toy model (A1111 cannot load those), so the key is left out.
"Lora hashes" is "name: hash, name: hash" with ':' and ',' removed from each name (as A1111's Lora extension
writes it: its parser splits on those), the hash being the first 12 hex digits of the sha256 of the data after the
safetensors header. "Seed" is the seed the image's generator really ran with.
"""

from __future__ import annotations

import json
import re

LORA_TAG = re.compile(r"<lora:([^:>]+):([^>]+)>")
# key: "json string" | plain value up to the next comma
_PAIR = re.compile(r'\s*([A-Za-z][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def quote(value) -> str:
    text = str(value)
    if any(c in text for c in ",:\n\""):
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def fmt_number(x: float) -> str:
    """5.0 -> "5", 0.35 -> "0.35": how A1111 prints CFG, strengths and denoise."""
    x = float(x)
    return str(int(x)) if x.is_integer() else f"{x:.6g}"


def seed_used(seed: int) -> int:
    """The seed a torch.Generator seeded with `seed` runs with (torch takes it modulo 2**64, so -1 runs as
    18446744073709551615): the number that reproduces the image, never a placeholder like -1."""
    return int(seed) % 2**64


def lora_hash_name(name: str) -> str:
    """A LoRA's name as A1111 writes it in "Lora hashes": without ':' and ','."""
    return str(name).replace(":", "").replace(",", "")


def lora_hashes(loras) -> str:
    """The "Lora hashes" value for [(name, short hash), ...]."""
    return ", ".join(f"{lora_hash_name(name)}: {h}" for name, h in loras)


def lora_tags(loras) -> str:
    """" <lora:name:1.2> <lora:other:-1>" for [(name, strength), ...]."""
    return "".join(f" <lora:{name}:{fmt_number(s)}>" for name, s in loras)


def build(prompt: str, negative_prompt: str, params: dict) -> str:
    """The infotext: prompt line(s), optional negative line, then the parameter line (dict order kept)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None and v != ""))
    return "\n".join(lines)


def parse(text: str) -> dict:
    """{"prompt", "negative_prompt", "params": {key: str}, "loras": [(name, strength)], "prompt_text"}.

    `prompt_text` is the prompt without <lora:...> tags: what the text encoder saw.
    """
    lines = text.strip("\n").split("\n")
    params: dict[str, str] = {}
    if lines and len(_PAIR.findall(lines[-1])) >= 3:  # a real parameter line, not a prompt with colons
        params = {k.strip(): unquote(v) for k, v in _PAIR.findall(lines[-1])}
        lines = lines[:-1]
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    prompt = "\n".join(prompt_lines)
    loras = []
    for name, s in LORA_TAG.findall(prompt):
        try:
            loras.append((name, float(s)))
        except ValueError:
            loras.append((name, s))
    return {"prompt": prompt, "prompt_text": LORA_TAG.sub("", prompt).strip(),
            "negative_prompt": "\n".join(negative_lines), "params": params, "loras": loras}


def read_png(path) -> dict | None:
    """The parsed "parameters" chunk of a PNG, or None when it has none."""
    from PIL import Image

    with Image.open(path) as im:
        text = im.info.get("parameters") or (im.text.get("parameters") if hasattr(im, "text") else None)
    return parse(text) if text else None


def pnginfo(text: str, extra: dict[str, str] | None = None):
    """A PngInfo with the "parameters" chunk (tEXt; PIL switches to iTXt for non-Latin-1 text)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    for k, v in (extra or {}).items():
        info.add_text(k, v)
    return info
