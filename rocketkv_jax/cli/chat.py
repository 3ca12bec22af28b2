"""`rocketkv chat`: a multi-turn chat whose KV cache lives across turns.

Each user turn is rendered with the model's chat template and only its new tokens are
prefilled against the cached history (`engine.conversation`, `chat_turns`); the reply
streams to stdout and joins the history. Interactive (a prompt on stdin, `/reset`,
`/quit`) or scripted (`--turns file.json`, one JSON line per turn on stdout). A statistics
line per turn goes to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from .. import checks
from ..names import DEFAULT_PREFILL_CHUNK, METHOD_NAMES, MULTI_TURN_METHOD_NAMES
from ..user_text import check_prompt, check_utf8, read_text_file
from .common import (
    PREFILL_CHUNK_FLAG,
    UserError,
    add_command,
    add_method_args,
    add_sampling_args,
    flag,
    load_model_on,
    method_from_flags,
)
from .streaming import Streamer

CHAT_METHODS = (*METHOD_NAMES, *MULTI_TURN_METHOD_NAMES)

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


def add_parser(sub):
    c = add_command(sub, "chat", help="multi-turn chat that keeps its KV cache",
                    description=CHAT_HELP, epilog=CHAT_EXAMPLES)
    c.add_argument("--model", type=Path, default=None, metavar="MODEL",
                   help="checkpoint dir or a named model (default: the embedded SmolLM2)")
    add_method_args(c, default="rocketkv-mt", names=CHAT_METHODS)
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


def read_turns(path: Path) -> list[str]:
    """The user turns of a JSON list: strings, or objects with a string "content"."""
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


@dataclasses.dataclass
class ChatSession:
    """One chat: its conversation (the KV cache), the messages so far (`TurnEncoder`), and
    what the next turn needs to know."""

    conv: Any  # engine.conversation.Conversation
    encoder: Any  # chat_turns.TurnEncoder
    tokenizer: Any
    stop: tuple[int, ...]
    capacity: int
    max_new_tokens: int
    sampling: Any
    seed: int
    document: str | None = None
    turn: int = 0
    reply_stopped: bool = True  # the last reply ended with a stop token

    def reset(self) -> None:
        self.conv.reset()
        self.encoder.reset()
        self.reply_stopped = True

    def one_turn(self, text: str, stream: bool) -> dict:
        """Prefill the user's turn, generate the reply (streamed to stdout if `stream`);
        the stats line goes to stderr. A turn the conversation cannot take raises
        UserError and leaves the history as it was."""
        from ..engine.conversation import ConversationError

        messages = self.encoder.messages
        first = not messages or all(m["role"] == "system" for m in messages)
        if first and self.document:
            text = self.document.rstrip() + "\n\n" + text
        ids = self.encoder.user(text, self.reply_stopped)
        try:
            appended = self.conv.append(ids)
        except ConversationError as e:  # the turn is not taken: forget it
            self.encoder.messages.pop()
            raise UserError(f"{e}") from None
        conv, tok = self.conv, self.tokenizer
        n = min(self.max_new_tokens, self.capacity - conv.lengths[0])
        if n < 1:
            raise UserError(f"the conversation is full ({conv.lengths[0]} of {self.capacity} "
                            f"tokens); /reset it or start again with a larger --capacity")
        streamer = Streamer(tok, self.stop) if stream else None
        # each reply samples with its own key: prng_key(seed, reply number) (Conversation)
        reply = conv.generate(n, sampling=self.sampling, seed=self.seed, on_step=streamer)
        out = reply.tokens[0]
        self.reply_stopped = bool(out) and out[-1] in self.stop
        text_out = tok.decode([t for t in out if t not in self.stop])
        self.encoder.assistant(text_out)
        if streamer is not None:
            streamer.finish(text_out)
        self.turn += 1
        s = reply.stats
        print(f"[turn {self.turn}] prefilled {appended.prefilled} tokens ({len(ids)} "
              f"of this turn) | "
              f"history {conv.lengths[0]} of {self.capacity} tokens | KV cache "
              f"{appended.cache_bytes / 2**20:.1f} MiB | decode {len(out)} tokens, "
              f"{s.decode_tokens_per_s:.1f} tok/s | compile "
              f"{appended.compile_s + s.compile_s:.1f} s", file=sys.stderr, flush=True)
        return {"turn": self.turn, "user": text, "reply": text_out,
                "prefilled": appended.prefilled, "history": conv.lengths[0],
                "generated": len(out), "decode_tokens_per_s": round(s.decode_tokens_per_s, 2)}


def cmd_chat(args) -> int:
    from ..chat_turns import TurnEncoder
    from ..engine.compile import enable_compilation_cache
    from ..engine.conversation import Conversation
    from ..sampling import Sampling
    from ..tokenizer import TokenizerError

    if args.skip_layers:
        raise UserError("--skip-layers is not supported by rocketkv chat yet; drop it")
    method = method_from_flags(args, CHAT_METHODS)
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
    model = load_model_on(args.model, None)  # in --weight-layout auto's layout
    tok, config = model.tokenizer, model.config
    ctx = config.max_position_embeddings
    capacity = args.capacity if args.capacity is not None else min(ctx, 8192)
    if capacity > ctx:
        raise UserError(f"--capacity {capacity} is larger than the model's context of {ctx} "
                        f"tokens; use at most {ctx}")
    stop = tok.stop_ids(config.eos_token_ids, chat=True)
    conv = Conversation(model.params, config, method, capacity=capacity,
                        prefill_chunk=args.prefill_chunk, stop_ids=stop,
                        kernels=args.kernels)
    chat = ChatSession(conv, TurnEncoder(tok, args.system), tok, stop, capacity,
                       args.max_new_tokens, Sampling(args.temperature, 0, args.top_p),
                       args.seed, document)
    if turns is not None:
        for t in turns:
            if t.strip() == "/reset":
                chat.reset()
                print(json.dumps({"reset": True}), flush=True)
                continue
            print(json.dumps(chat.one_turn(t, stream=False)), flush=True)
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
            chat.reset()
            print("(conversation reset)", file=sys.stderr, flush=True)
            continue
        try:  # a bad line or a full conversation costs one message, not the session
            chat.one_turn(check_utf8(line, f"input line {n_line}", UserError), stream=True)
        except (UserError, TokenizerError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
