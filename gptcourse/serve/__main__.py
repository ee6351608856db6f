"""``python -m gptcourse.serve``: serve a chat model (see ``--help`` and gptcourse.serve.cli)."""
import sys

from .cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
