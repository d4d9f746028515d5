"""``python -m seqpar.data``: ``prepare`` token files from text / JSONL, or ``info`` on a token file or directory."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m seqpar.data``."""
    parser = argparse.ArgumentParser(prog="python -m seqpar.data", description="Token files for seqpar training.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize .txt / .md / .rst / .jsonl files (or directories of them) into train.bin / val.bin",
                       description="Tokenize .txt / .md / .rst / .jsonl files (or directories of them, searched recursively) into "
                                   "OUT/train.bin and OUT/val.bin (flat uint16 / uint32 token ids, an end-of-document "
                                   "id after every document) with JSON sidecars train.bin.json / val.bin.json.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt or .jsonl files, or directories of them")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="a local Hugging Face tokenizer.json (default: bytes; ids 0-255, end of document 256, vocab 257)")
    p.add_argument("--eos-token", default=None, metavar="TOKEN",
                   help="the tokenizer's end-of-document token (default: the first of <|endoftext|>, </s>, "
                        "<|end_of_text|>, <eos>, [EOS], <|eos|> in its vocabulary)")
    p.add_argument("--val-fraction", type=float, default=0.05, metavar="X",
                   help="fraction of the documents held out in val.bin, chosen by a hash of each document (default 0.05)")
    p.add_argument("--text-key", default="text", metavar="KEY", help="the text field of .jsonl records (default text)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train / val hash (default 0)")
    p.add_argument("--split-on-blank-lines", action="store_true",
                   help="a .txt file holds one document per blank-line-separated paragraph (default: one per file)")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"),
                   help="token dtype (default auto: uint16 when the vocabulary fits, else uint32)")
    p.add_argument("--overwrite", action="store_true", help="replace train.bin / val.bin already in DIR")
    i = sub.add_parser("info", help="describe a token file or directory (splits, tokens, dtype, eos, vocabulary)")
    i.add_argument("path", metavar="PATH")
    i.add_argument("--dtype", default=None, choices=("uint16", "uint32"), help="dtype of a raw file without metadata")
    i.add_argument("--eos-id", type=int, default=None, help="end-of-document id of a raw file without metadata")
    i.add_argument("--val-fraction", type=float, default=0.05, help="held out when there is no val file (default 0.05)")
    i.add_argument("--seq-len", type=int, default=None, help="also print the rows per epoch at this length")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; a bad input prints ``error: ...`` and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            from seqpar.data.prepare import prepare

            summary = prepare(args.inputs, args.out, tokenizer=args.tokenizer, eos_token=args.eos_token,
                              val_fraction=args.val_fraction, text_key=args.text_key, seed=args.seed,
                              split_on_blank_lines=args.split_on_blank_lines, dtype=args.dtype,
                              overwrite=args.overwrite)
            print(summary.line())
        else:
            from seqpar.data.tokens import TokenDataset

            ds = TokenDataset(args.path, dtype=args.dtype, eos_id=args.eos_id, val_fraction=args.val_fraction)
            print(ds.describe())
            if args.seq_len is not None:
                rows = {s: ds.rows_per_epoch(args.seq_len, s) if len(ds.split(s)) > args.seq_len else 0
                        for s in ("train", "val")}
                print(f"seq_len {args.seq_len}: {rows['train']:,} train rows, {rows['val']:,} val rows per epoch")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
