"""The request bodies the server takes, as pydantic models with strict types (no "5" for 5,
no true for 1), and pydantic's complaints turned into one sentence that names the field.

Fields of OpenAI's API that this server cannot honour (n > 1, logprobs, tools, penalties,
...) are refused when set to anything but their neutral value; those that do not change
the answer (`user`, `metadata`, `store`, ...) are taken and ignored. A field of the body
that OpenAI's API does not have either is refused, as OpenAI refuses it ("max_token" is a
typo, not a wish to be ignored); inside a message, unknown keys are ignored (clients send
back the assistant messages they received, with `refusal`, `tool_calls`, ... set to null).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .. import checks

MAX_STOPS = 4  # as OpenAI


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


# OpenAI's fields this server does not implement, with the values that mean "not used"
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
               "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "logit_bias": (None, {}), "best_of": (None, 1),
               "echo": (None, False), "suffix": (None, ""),
               "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]),
               "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
               "verbosity": (None,), "web_search_options": (None,)}


class _Generation(_Body):
    """What both endpoints take."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    max_tokens: Annotated[int, Field(ge=1, lt=checks.COUNT_LIMIT)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=checks.SEED_LIMIT)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # our extensions: the KV method by registry name and its budget (null: full KV)
    method: str | None = None
    token_budget: Annotated[int, Field(ge=1, lt=checks.COUNT_LIMIT)] | None = None
    # and vLLM's: generate max_tokens tokens, not stopping at the end-of-text token
    ignore_eos: bool = False
    # OpenAI's fields that do not change the answer: checked, then ignored
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        """Refuse an unsupported field that asks for something; drop one that does not."""
        if isinstance(data, dict):
            for name, neutral in UNSUPPORTED.items():
                if name in data and not any(_same(data[name], n) for n in neutral):
                    raise UnsupportedField(name)
            data = {k: v for k, v in data.items() if k not in UNSUPPORTED}
        return data

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) \
            else list(self.stop)


class ChatRequest(_Generation):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, lt=checks.COUNT_LIMIT)] | None = None


class CompletionRequest(_Generation):
    # text, one text in a list, or token ids
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | \
        Annotated[list[int], Field(min_length=1)]


def _same(value, neutral) -> bool:
    """Equal, with JSON's true and false never equal to a number (0 and 0.0 are)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    return value == neutral


class UnsupportedField(ValueError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


# what a union field takes, said once (pydantic would list each member's complaint)
UNION_FIELDS = {
    "stop": f"a string or a list of at most {MAX_STOPS} strings",
    "prompt": "a string, a list of one string, or a non-empty list of token ids (integers)",
    "content": 'a string or a list of {"type": "text", "text": ...} parts',
}


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """The first complaint of `e` as (one sentence naming the field, the field's name)."""
    err = e.errors(include_url=False)[0]
    path = [p for p in err["loc"] if not _is_type_tag(p)]
    where = ".".join(str(p) for p in path)
    got = _shown(err.get("input"))
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, UnsupportedField):
        return (f"'{cause.name}' is not supported by this server; leave it out (it serves "
                f"one choice, without logprobs, tools, penalties or response formats)",
                cause.name)
    if err["type"] == "missing":
        return f"'{where}' is required", where
    if err["type"] == "extra_forbidden":
        return (f"unrecognized field '{where}': neither OpenAI's API nor this server has "
                f"it; check its spelling (docs/serving.md lists the fields)", where)
    if path and path[-1] in UNION_FIELDS and len(path) < len(err["loc"]):
        return f"'{where}' must be {UNION_FIELDS[path[-1]]}, got {got}", where
    if path == ["n"]:
        return f"'n' must be 1: this server returns one choice per request, got {got}", "n"
    text = err["msg"]
    return f"'{where}': {text[0].lower() + text[1:]}, got {got}", where or None


def _shown(value) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return repr(value)


def _is_type_tag(part) -> bool:
    """pydantic names the union member it tried (`str`, `list[int]`, ...) in `loc`."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool")
                                      or part.startswith(("list[", "function-", "constrained",
                                                          "TextPart")))
