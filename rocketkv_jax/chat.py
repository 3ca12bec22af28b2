"""`rocketkv chat`: a multi-turn chat whose KV cache lives across turns (conversation.py).

Each user turn is rendered with the model's chat template and only its new tokens are
prefilled against the cached history; the reply streams to stdout and joins the history.
Interactive (a prompt on stdin, `/reset`, `/quit`) or scripted (`--turns file.json`, one
JSON line per turn on stdout). A statistics line per turn goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

CHAT_HELP = """Chat with SmolLM2 (embedded, the default) or a converted checkpoint, keeping the
KV cache across turns: each turn prefills only its own tokens against the cached history
(the template's user header, the message, the assistant header), so later questions about a
long --document cost only their tokens.

Methods across turns: full and topk (the oracle) attend over every turn; rocketkv-mt and
snapkv-mt keep the full history and compress a temporary copy per turn (RocketKV-MT), so a
later question can reach tokens an earlier turn's selection dropped; every other method is
applied as in one turn: the history is compressed once, at the first reply, and later turns
are added to that compressed cache (what they evicted is gone).

Interactive commands: /reset forgets the conversation, /quit (or end of input) leaves.
With --turns FILE the turns come from a JSON list (strings, {"content": ...} objects, or
"/reset"), and one JSON line per turn is printed: {"turn", "user", "reply", "prefilled",
"history", "generated", "decode_tokens_per_s"}.

After each turn a statistics line on stderr gives the new tokens prefilled, the history
length, the KV cache size and the decode speed."""

CHAT_EXAMPLES = """examples:
  rocketkv chat
  rocketkv chat --document paper.txt --method rocketkv-mt --token-budget 256
  rocketkv chat --turns turns.json --method full --max-new-tokens 32
"""

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "</s>")  # chat models' end-of-turn tokens


def add_chat_parser(sub) -> argparse.ArgumentParser:
    from . import checks
    from .checks import flag
    from .cli import PREFILL_CHUNK_FLAG, _add_method_args, add_sampling_args
    from .names import DEFAULT_PREFILL_CHUNK, MULTI_TURN_METHOD_NAMES

    c = sub.add_parser("chat", help="multi-turn chat that keeps its KV cache",
                       description=CHAT_HELP, epilog=CHAT_EXAMPLES)
    c.add_argument("--model", type=Path, default=None, metavar="MODEL",
                   help="checkpoint dir or a named model (default: the embedded SmolLM2)")
    _add_method_args(c)
    for a in c._actions:
        if a.dest == "method":
            a.help = a.help.replace(" (default", ", " + ", ".join(MULTI_TURN_METHOD_NAMES)
                                    + " (default", 1)
            a.default = "rocketkv-mt"
            a.help = a.help.replace("(default: rocketkv)", "(default: rocketkv-mt)")
    c.add_argument("--capacity", type=flag(checks.capacity), default=None, metavar="TOKENS",
                   help="most tokens the conversation holds (turns and replies); the KV cache "
                   "is allocated for it once (default: the model's context, at most 8192)")
    c.add_argument("--max-new-tokens", type=flag(checks.max_new_tokens), default=256,
                   metavar="N",
                   help="most tokens per reply")
    c.add_argument("--document", type=Path, default=None, metavar="FILE",
                   help="a text file put before the first message (chat about a document)")
    c.add_argument("--system", default=None, metavar="TEXT",
                   help="a system message (default: the template's own, if any)")
    c.add_argument("--turns", type=Path, default=None, metavar="FILE.json",
                   help="run the turns of this JSON list instead of reading stdin")
    add_sampling_args(c, top_k=False)
    c.add_argument("--prefill-chunk", type=PREFILL_CHUNK_FLAG, default=DEFAULT_PREFILL_CHUNK,
                   metavar="TOKENS", help="turn tokens per prefill chunk; 0 = a turn in one pass")
    c.set_defaults(func=cmd_chat)
    return c


# ------------------------------------------------------------------ turn encoding
class TurnEncoder:
    """Token ids of each new user turn, given what the history already holds.

    With a chat template, turn n is the text the template adds for it: the rendering of
    every message so far minus the rendering before it (the previous reply and what the
    template puts after it), starting right after the reply's end-of-turn token (or with
    it, when the reply was cut by --max-new-tokens). Without a template (a bare tokenizer),
    a turn is its text.
    """

    def __init__(self, tokenizer, system: str | None = None):
        self.tok = tokenizer
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.eot = next((t for t in END_OF_TURN if tokenizer.token_id(t) is not None), None)

    @property
    def templated(self) -> bool:
        return bool(self.tok.chat_template)

    def user(self, text: str, reply_stopped: bool = True) -> list[int]:
        """The new turn's token ids; the message joins the history only if they can be
        made (a template that refuses it leaves the history as it was)."""
        ids = self._encode_user(text, reply_stopped)
        self.messages.append({"role": "user", "content": text})
        return ids

    def _encode_user(self, text: str, reply_stopped: bool) -> list[int]:
        messages = [*self.messages, {"role": "user", "content": text}]
        if not self.templated:
            return self.tok.encode(text if len(messages) == 1 else " " + text)
        answered = any(m["role"] == "assistant" for m in self.messages)
        before = self.tok.apply_chat_template(self.messages, add_generation_prompt=False) \
            if answered else ""
        full = self.tok.apply_chat_template(messages, add_generation_prompt=True)
        if not answered:
            return self.tok.encode(full, add_special_tokens=False)
        if not full.startswith(before):  # a template that rewrites earlier turns
            raise ValueError("this model's chat template renders earlier turns differently "
                             "once a new one is added; its conversations cannot keep a cache")
        tail = ""
        if self.eot and self.eot in before:
            tail = before[before.rfind(self.eot) + len(self.eot):]
        prefix = tail if reply_stopped or not self.eot else self.eot + tail
        return self.tok.encode(prefix + full[len(before):], add_special_tokens=False)

    def assistant(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]


def read_turns(path: Path) -> list[str]:
    """The user turns of a JSON list: strings, or objects with a string "content"."""
    from .cli import UserError
    from .user_text import check_prompt, read_text_file

    try:
        data = json.loads(read_text_file(path, "turns file", UserError))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); expected a list of turns, e.g. "
                        f'["Hello", "And then?"]') from None
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a non-empty JSON list of turns (strings or "
                        f'{{"content": ...}} objects)')
    turns = []
    for i, t in enumerate(data):
        if isinstance(t, dict):
            t = t.get("content")
        if not isinstance(t, str):
            raise UserError(f"{path}: turn {i} is not a non-empty string or an object with a "
                            f"non-empty string 'content'")
        turns.append(check_prompt(t, f"{path}: turn {i}", UserError))
    return turns


# ------------------------------------------------------------------ the command
def chat_method(args):
    """The method of --method: a multi-turn name builds its base method's flags first."""
    from .cli import make_method_from_args
    from .methods import make_method
    from .names import MULTI_TURN_METHOD_NAMES

    if args.method not in MULTI_TURN_METHOD_NAMES:
        return make_method_from_args(args)
    base = make_method_from_args(argparse.Namespace(**{**vars(args),
                                                       "method": args.method[:-3]}))
    hp = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
          if f.name != "token_budget"}
    return make_method(args.method, base.token_budget, **hp)


def cmd_chat(args) -> int:
    from .cli import UserError, _check_vocab, _Streamer
    from .engine.compile import enable_compilation_cache
    from .engine.conversation import Conversation, ConversationError
    from .model_store import load_model
    from .sampling import Sampling
    from .tokenizer import TokenizerError
    from .user_text import check_utf8, read_text_file

    if args.skip_layers:
        raise UserError("--skip-layers is not supported by rocketkv chat yet; drop it")
    method = chat_method(args)
    turns = read_turns(args.turns) if args.turns is not None else None
    if turns is None and sys.stdin is None:
        raise UserError("standard input is closed: type or pipe the turns, or give "
                        "--turns FILE")
    document = None
    if args.document is not None:
        document = read_text_file(args.document, "document", UserError)
    if args.system is not None:
        check_utf8(args.system, "--system", UserError)
    enable_compilation_cache()
    model = load_model(args.model)
    tok, config = model.tokenizer, model.config
    ctx = config.max_position_embeddings
    capacity = args.capacity if args.capacity is not None else min(ctx, 8192)
    if capacity > ctx:
        raise UserError(f"--capacity {capacity} is larger than the model's context of {ctx} "
                        f"tokens; use at most {ctx}")
    stop = set(config.eos_token_ids)
    if tok.eos_token_id is not None:
        stop.add(tok.eos_token_id)
    for t in END_OF_TURN:
        if (i := tok.token_id(t)) is not None:
            stop.add(i)
    conv = Conversation(model.params, config, method, capacity=capacity,
                        prefill_chunk=args.prefill_chunk, stop_ids=sorted(stop),
                        kernels=args.kernels)
    encoder = TurnEncoder(tok, args.system)
    sampling = Sampling(args.temperature, 0, args.top_p)
    state = {"turn": 0, "stopped": True}

    def one_turn(text: str, stream: bool) -> dict:
        first = not encoder.messages or all(m["role"] == "system" for m in encoder.messages)
        if first and document:
            text = document.rstrip() + "\n\n" + text
        ids = encoder.user(text, state["stopped"])
        try:
            _check_vocab([ids], config.vocab_size, model.path)
            appended = conv.append(ids)
        except (UserError, ConversationError) as e:  # the turn is not taken: forget it
            encoder.messages.pop()
            raise UserError(f"{e}") from None
        n = min(args.max_new_tokens, capacity - conv.lengths[0])
        if n < 1:
            raise UserError(f"the conversation is full ({conv.lengths[0]} of {capacity} "
                            f"tokens); /reset it or start again with a larger --capacity")
        streamer = _Streamer(tok, stop) if stream else None
        # each reply samples with its own key: prng_key(seed, reply number) (Conversation)
        reply = conv.generate(n, sampling=sampling, seed=args.seed, on_step=streamer)
        out = reply.tokens[0]
        state["stopped"] = bool(out) and out[-1] in stop
        text_out = tok.decode([t for t in out if t not in stop])
        encoder.assistant(text_out)
        if streamer is not None:
            streamer.finish(text_out)
        state["turn"] += 1
        s = reply.stats
        print(f"[turn {state['turn']}] prefilled {appended.prefilled} tokens ({len(ids)} "
              f"of this turn) | "
              f"history {conv.lengths[0]} of {capacity} tokens | KV cache "
              f"{appended.cache_bytes / 2**20:.1f} MiB | decode {len(out)} tokens, "
              f"{s.decode_tokens_per_s:.1f} tok/s | compile "
              f"{appended.compile_s + s.compile_s:.1f} s", file=sys.stderr, flush=True)
        return {"turn": state["turn"], "user": text, "reply": text_out,
                "prefilled": appended.prefilled, "history": conv.lengths[0],
                "generated": len(out), "decode_tokens_per_s": round(s.decode_tokens_per_s, 2)}

    def reset():
        conv.reset()
        encoder.reset()
        state["stopped"] = True

    if turns is not None:
        for t in turns:
            if t.strip() == "/reset":
                reset()
                print(json.dumps({"reset": True}), flush=True)
                continue
            print(json.dumps(one_turn(t, stream=False)), flush=True)
        return 0
    print(f"rocketkv chat: {config.model_type}, method {method.name}, capacity {capacity} "
          f"tokens. /reset to start over, /quit to leave.", file=sys.stderr, flush=True)
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:  # a bad byte becomes a lone surrogate, refused per line below
        reconfigure(errors="surrogateescape")
    n_line = 0
    while True:
        try:
            line = input("> ")
            n_line += 1
        except EOFError:
            print(file=sys.stderr)
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/quit", "/exit"):
            return 0
        if cmd == "/reset":
            reset()
            print("(conversation reset)", file=sys.stderr, flush=True)
            continue
        try:  # a bad line or a full conversation costs one message, not the session
            one_turn(check_utf8(line, f"input line {n_line}", UserError), stream=True)
        except (UserError, TokenizerError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
