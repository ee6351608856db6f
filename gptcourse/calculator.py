"""The course's tool: a safe calculator, and the syntax a model calls it with.

    >>> calculate("48213*937")
    45175581
    >>> parse_call("<calc>2+3*4</calc>")
    ToolCall(name='calc', argument='2+3*4', args=('+', 2, ('*', 3, 4)))

A tiny recursive-descent parser for integers, + - * and parentheses, never
``eval``; bounded in the length of the expression, the digits of each number
and of each intermediate result. gptcourse.tools runs it in the tool loop.
"""
import re
from dataclasses import dataclass
from typing import Callable

# ----------------------------------------------------------------------------
# The calculator: a recursive-descent parser, never eval
# ----------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 64   # longer arguments are refused
MAX_NUMBER_DIGITS = 12      # per number in the expression
MAX_RESULT_DIGITS = 30      # per intermediate result: no 9**9**9 surprises

_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")


def _tokens(expression):
    """'12 + 3*4' -> ['12', '+', '3', '*', '4']; ValueError for other characters."""
    out = []
    for number, symbol in _TOKEN.findall(expression):
        if number:
            if len(number) > MAX_NUMBER_DIGITS:
                raise ValueError(f"number {number[:15]}... has {len(number)} digits; "
                                 f"the calculator takes at most {MAX_NUMBER_DIGITS}")
            out.append(number)
        elif symbol.strip():
            if symbol not in "+-*()":
                raise ValueError(f"unexpected character {symbol!r} in {expression!r}: "
                                 f"the calculator knows digits, + - * and parentheses")
            out.append(symbol)
    return out


def parse_expression(expression):
    """Parse an arithmetic expression into a tree of tuples.

    Grammar (usual precedence, left to right):
        expr   := term (('+' | '-') term)*
        term   := factor ('*' factor)*
        factor := '-' factor | NUMBER | '(' expr ')'

    >>> parse_expression("2+3*4")
    ('+', 2, ('*', 3, 4))
    >>> parse_expression("(2+3)*-4")
    ('*', ('+', 2, 3), ('neg', 4))
    """
    if not isinstance(expression, str):
        raise ValueError(f"an expression must be a str, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression of {len(expression)} characters is too long "
                         f"(at most {MAX_EXPRESSION_CHARS})")
    tokens = _tokens(expression)
    if not tokens:
        raise ValueError("empty expression: the call has no argument")
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr(depth):
        node = term(depth)
        while peek() in ("+", "-"):
            node = (take(), node, term(depth))
        return node

    def term(depth):
        node = factor(depth)
        while peek() == "*":
            take()
            node = ("*", node, factor(depth))
        return node

    def factor(depth):
        if depth > 20:
            raise ValueError(f"expression {expression!r} is nested too deeply")
        token = peek()
        if token is None:
            raise ValueError(f"expression {expression!r} ends where a number was expected")
        if token == "-":
            take()
            return ("neg", factor(depth + 1))
        if token == "(":
            take()
            node = expr(depth + 1)
            if peek() != ")":
                raise ValueError(f"unbalanced parentheses in {expression!r}")
            take()
            return node
        if token.isdigit():
            return int(take())
        raise ValueError(f"unexpected {token!r} in {expression!r} where a number was expected")

    tree = expr(0)
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r} in {expression!r} after a complete expression")
    return tree


def evaluate(tree):
    """The value of a tree from parse_expression (a Python int, exact).

    >>> evaluate(('-', 7, ('*', 2, 5)))
    -3
    """
    if isinstance(tree, int):
        return tree
    if tree[0] == "neg":
        return -evaluate(tree[1])
    op, a, b = tree[0], evaluate(tree[1]), evaluate(tree[2])
    value = a + b if op == "+" else a - b if op == "-" else a * b
    if len(str(abs(value))) > MAX_RESULT_DIGITS:
        raise ValueError(f"result has more than {MAX_RESULT_DIGITS} digits")
    return value


def calculate(expression):
    """Parse and evaluate: calculate("48213*937") == 45175581."""
    return evaluate(parse_expression(expression))


# ----------------------------------------------------------------------------
# Tools and calls
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    """A tool the model may call: `parse` checks the argument text and turns
    it into structured arguments (ValueError if it cannot), `run` computes
    the result text from them."""
    name: str
    description: str
    parse: Callable
    run: Callable


CALCULATOR = Tool("calc", "exact integer arithmetic: + - * and parentheses",
                  parse=parse_expression, run=lambda tree: str(evaluate(tree)))
TOOLS = {CALCULATOR.name: CALCULATOR}


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: the tool's name, the argument as written, and the
    structured arguments its `parse` made of it."""
    name: str
    argument: str
    args: object


_OPEN_TAG = re.compile(r"<([a-z_]+)>")


def parse_call(text, tools=None):
    """'<name>argument</name>' -> ToolCall, or ValueError saying what is wrong.

    Refused: no or unbalanced tags, a tool not in `tools` (default TOOLS),
    a newline inside, an argument the tool's parser refuses (bad characters,
    numbers too long, ...). Never raises anything but ValueError for a str.
    """
    tools = TOOLS if tools is None else tools
    if not isinstance(text, str):
        raise ValueError(f"a call must be a str, got {type(text).__name__}")
    shown = text if len(text) <= 60 else text[:57] + "..."
    match = _OPEN_TAG.match(text)
    if not match:
        raise ValueError(f"a call must start with '<name>', got {shown!r}")
    name = match.group(1)
    if name not in tools:
        raise ValueError(f"unknown tool {name!r}; known: {', '.join(sorted(tools)) or 'none'}")
    close = f"</{name}>"
    if not text.endswith(close) or len(text) < len(match.group(0)) + len(close):
        raise ValueError(f"a call must end with {close!r}, got {shown!r}")
    argument = text[len(match.group(0)):-len(close)]
    if "\n" in argument:
        raise ValueError(f"a call must fit on one line, got {shown!r}")
    if "<" in argument or ">" in argument:
        raise ValueError(f"unbalanced tags in {shown!r}")
    try:
        args = tools[name].parse(argument)
    except ValueError as e:
        raise ValueError(f"bad argument for {name}: {e}") from None
    except Exception as e:  # a tool's own parser must not crash the loop
        raise ValueError(f"bad argument for {name}: {type(e).__name__}: {e}") from None
    return ToolCall(name, argument, args)
