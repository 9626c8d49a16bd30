"""The attribute expression language: parsed once (syntax at load, names at patch), evaluated safely.

An expression reads one value out of a wrapped call's arguments or return value, for example
``args[0] | attr input_batch | attr req_ids | len`` or ``len(return) | str``. Grammar::

    expression := unary ( '|' step )*
    step       := 'len' | 'str' | 'int' | 'float' | 'bool' | 'attr' NAME postfix*
    unary      := CALLABLE '(' expression ')' postfix*
                | operand postfix*
                | '(' expression ')' postfix*
    CALLABLE   := 'len' | 'str' | 'int' | 'float' | 'bool'
    operand    := 'args' | 'kwargs' | 'this' | 'self' | 'return' | NAME
    postfix    := '.' NAME | '[' INT ']' | '[' STRING ']' | '[' INT? ':' INT? ']'
    NAME       := [A-Za-z_][A-Za-z0-9_]*      (names starting with '__' are rejected)
    INT        := '-'? [0-9]+
    STRING     := '...' | "..."                 (escapes: \\\\ \\' \\" only)

Operands: ``args`` is the full positional tuple the wrapped function received (self included for
methods), ``kwargs`` the keyword dict, ``this`` / ``self`` are ``args[0]``, ``return`` is the return
value (an evaluation error before the call returned). Any other NAME is a parameter of the target,
bound through its signature at compile time: read from kwargs when passed by keyword, else from args
by its position, else its default. The signature must describe the function as the wrapper calls it
(for a method: the function from the class, with ``self``). Reserved operands win over parameters of
the same name; ``args`` is always the whole tuple, never just the ``*args`` part. A NAME that is not
a parameter is a compile error, unless the signature is unknown or has ``*args`` / ``**kwargs``: then
it is read from kwargs by name.

``attr NAME`` after a pipe is ``.NAME`` and may carry postfixes (``| attr a.b[0]``). ``str`` results
are cut to 4096 characters. Nothing but len/str/int/float/bool can be called, and attribute access
goes through ``object.__getattribute__`` so a class's ``__getattr__`` never runs (property getters,
``__len__``, ``__getitem__``, ``__str__`` do: they are what the expression asks for).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["MISSING", "CompiledExpression", "ExpressionError", "ExpressionEvalError", "compile_expression"]

STR_LIMIT: Final = 4096
_MAX_INT_DIGITS: Final = 30  # far above any index or constant; Python refuses int() past 4300 digits
_MAX_DEPTH: Final = 32  # parenthesis/call nesting; keeps the recursive parser far from RecursionError

# One compiled node: (args, kwargs, result) -> value.
_Eval = Callable[[tuple[Any, ...], dict[str, Any], Any], Any]


class _MissingType:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final[Any] = _MissingType()


class ExpressionError(ValueError):
    """A compile error: where (1-based column) and what was expected."""

    def __init__(self, message: str, source: str, column: int, hint: str = "") -> None:
        self.message = message
        self.source = source
        self.column = column
        self.hint = hint
        shown = source if len(source) <= 200 else source[:200] + "..."  # a message, not a dump
        text = f'{message} at column {column} in "{shown}"'
        super().__init__(f"{text}; {hint}" if hint else text)


class ExpressionEvalError(Exception):
    """Evaluating an expression failed; the original exception is ``__cause__`` and ``cause``."""

    def __init__(self, source: str, cause: BaseException) -> None:
        self.source = source
        self.cause = cause
        try:
            detail = str(cause)
        except Exception:  # a user exception with a broken __str__ must not escape evaluate()
            detail = "<unprintable>"
        super().__init__(f'cannot evaluate "{source}": {type(cause).__name__}: {detail}')


@dataclass(frozen=True)
class CompiledExpression:
    """An expression compiled to a tree of closures; ``evaluate`` is the only per-call cost."""

    source: str
    uses_return: bool
    _evaluator: _Eval = field(repr=False, compare=False)

    @property
    def evaluator(self) -> _Eval:
        """The raw compiled closure `(args, kwargs, result) -> value`. It raises whatever the evaluation
        raised: for hot paths that catch `Exception` themselves and build `ExpressionEvalError` only on
        failure (saving a call layer per attribute)."""
        return self._evaluator

    def evaluate(self, args: tuple[Any, ...], kwargs: dict[str, Any], result: object = MISSING) -> object:
        try:
            return self._evaluator(args, kwargs, result)
        except Exception as exc:  # the contract: nothing but ExpressionEvalError leaves an evaluation
            raise ExpressionEvalError(self.source, exc) from exc


def compile_expression(source: str, signature: inspect.Signature | None = None) -> CompiledExpression:
    """Parse ``source`` once; raises ExpressionError with the column and what was expected."""
    parser = _Parser(source, signature)
    evaluator = parser.parse()
    return CompiledExpression(source, parser.uses_return, evaluator)


# ---------------------------------------------------------------- tokenizer

_OPS: Final = frozenset("|.[]():,")  # ',' only so that `f(a, b)` gets the "cannot be called" error
_DIGITS: Final = frozenset("0123456789")
_NAME_START: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS: Final = _NAME_START | _DIGITS
_ESCAPES: Final = frozenset("\\'\"")


@dataclass(frozen=True)
class _Token:
    kind: str  # "name", "int", "str", "op", "end"
    value: Any  # str for name/str/op, int for int
    column: int

    def describe(self) -> str:
        return {"end": "end of expression", "str": "a string"}.get(self.kind, f"'{self.value}'")


def _tokenize(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(source)
    while i < n:
        ch = source[i]
        start = i
        if ch.isspace():
            i += 1
        elif ch in _OPS:
            tokens.append(_Token("op", ch, start + 1))
            i += 1
        elif ch in _NAME_START:
            while i < n and source[i] in _NAME_CHARS:
                i += 1
            tokens.append(_Token("name", source[start:i], start + 1))
        elif ch in _DIGITS or (ch == "-" and i + 1 < n and source[i + 1] in _DIGITS):
            i += 1
            while i < n and source[i] in _DIGITS:
                i += 1
            digits = source[start:i]
            if len(digits.lstrip("-")) > _MAX_INT_DIGITS:
                raise ExpressionError(f"integer of {len(digits.lstrip('-'))} digits (at most {_MAX_INT_DIGITS})",
                                      source, start + 1, "an index or constant is a short number")
            tokens.append(_Token("int", int(digits), start + 1))
        elif ch in "'\"":
            i, text = _read_string(source, i)
            tokens.append(_Token("str", text, start + 1))
        else:
            raise ExpressionError(f"unexpected character {ch!r}", source, start + 1)
    tokens.append(_Token("end", "", n + 1))
    return tokens


def _read_string(source: str, start: int) -> tuple[int, str]:
    quote, i, chars = source[start], start + 1, list[str]()
    while i < len(source):
        ch = source[i]
        if ch == quote:
            return i + 1, "".join(chars)
        if ch == "\\":
            if i + 1 >= len(source) or source[i + 1] not in _ESCAPES:
                hint = "only \\\\, \\' and \\\" are allowed"
                raise ExpressionError("unsupported escape", source, i + 1, hint)
            ch = source[i + 1]
            i += 1
        chars.append(ch)
        i += 1
    raise ExpressionError(f"expected closing {quote}", source, len(source) + 1, "unterminated string")


# ---------------------------------------------------------------- nodes

_getattribute: Final = object.__getattribute__


def _to_str(value: object) -> str:
    return str(value)[:STR_LIMIT]


_Convert = Callable[[Any], Any]
_CALLABLES: Final[dict[str, _Convert]] = {
    "len": len,
    "str": _to_str,
    "int": int,
    "float": float,
    "bool": bool,
}
_CALLABLE_NAMES: Final = "len, str, int, float, bool"


def _read_args(a: tuple[Any, ...], k: dict[str, Any], r: Any) -> Any:
    return a


def _read_kwargs(a: tuple[Any, ...], k: dict[str, Any], r: Any) -> Any:
    return k


def _read_return(a: tuple[Any, ...], k: dict[str, Any], r: Any) -> Any:
    if r is MISSING:
        raise LookupError("'return' has no value: the function has not returned")
    return r


def _call_node(fn: _Convert, inner: _Eval) -> _Eval:
    if fn is len:  # the common case, without an indirection through `fn`
        return lambda a, k, r: len(inner(a, k, r))
    return lambda a, k, r: fn(inner(a, k, r))


def _attr_node(inner: _Eval, name: str) -> _Eval:
    return lambda a, k, r: _getattribute(inner(a, k, r), name)


def _item_node(inner: _Eval, key: Any) -> _Eval:
    if inner is _read_args:  # args[i] / kwargs['k']: one closure instead of two
        return lambda a, k, r: a[key]
    if inner is _read_kwargs:
        return lambda a, k, r: k[key]
    return lambda a, k, r: inner(a, k, r)[key]


def _kwarg_node(name: str) -> _Eval:
    def read(a: tuple[Any, ...], k: dict[str, Any], r: Any) -> Any:
        try:
            return k[name]
        except KeyError:
            raise LookupError(f"'{name}' was not passed by keyword") from None

    return read


def _parameter_node(param: inspect.Parameter, position: int, named: frozenset[str]) -> _Eval:
    name, default = param.name, param.default
    has_default = default is not inspect.Parameter.empty
    if param.kind is inspect.Parameter.VAR_POSITIONAL:
        return lambda a, k, r: a[position:]
    if param.kind is inspect.Parameter.VAR_KEYWORD:
        return lambda a, k, r: {key: v for key, v in k.items() if key not in named}
    positional = param.kind is not inspect.Parameter.KEYWORD_ONLY
    by_keyword = param.kind is not inspect.Parameter.POSITIONAL_ONLY

    def read(a: tuple[Any, ...], k: dict[str, Any], r: Any) -> Any:
        # A valid call passes a parameter either by position or by keyword, never both.
        if positional and len(a) > position:
            return a[position]
        if by_keyword and name in k:
            return k[name]
        if has_default:
            return default
        raise LookupError(f"argument '{name}' was not passed and has no default")

    return read


# ---------------------------------------------------------------- parser


class _Parser:
    def __init__(self, source: str, signature: inspect.Signature | None) -> None:
        self.source = source
        self.signature = signature
        self.tokens = _tokenize(source)
        self.pos = 0
        self.depth = 0
        self.uses_return = False

    def parse(self) -> _Eval:
        node = self.expression()
        tok = self.peek()
        if tok.kind != "end":
            raise self.error("expected '|' or end of expression", tok)
        return node

    # -- token helpers

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def at_op(self, op: str) -> bool:
        tok = self.peek()
        return tok.kind == "op" and tok.value == op

    def expect_op(self, op: str) -> None:
        if not self.at_op(op):
            raise self.error(f"expected '{op}'", self.peek())
        self.pos += 1

    def expect_name(self, what: str) -> str:
        tok = self.peek()
        if tok.kind != "name":
            raise self.error(f"expected {what}", tok)
        self.pos += 1
        return self.checked_name(tok)

    def checked_name(self, tok: _Token) -> str:
        if tok.value.startswith("__"):
            hint = "names starting with '__' (dunders, private names) cannot be read"
            raise ExpressionError(f"name '{tok.value}' is not allowed", self.source, tok.column, hint)
        return str(tok.value)

    def error(self, message: str, tok: _Token, hint: str = "") -> ExpressionError:
        found = f"found {tok.describe()}"
        return ExpressionError(message, self.source, tok.column, f"{found}; {hint}" if hint else found)

    # -- grammar

    def expression(self) -> _Eval:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.error(f"expression nested deeper than {_MAX_DEPTH} levels", self.peek())
        node = self.unary()
        while self.at_op("|"):
            self.pos += 1
            node = self.step(node)
        self.depth -= 1
        return node

    def step(self, node: _Eval) -> _Eval:
        tok = self.peek()
        if tok.kind == "name" and tok.value in _CALLABLES:
            self.pos += 1
            return _call_node(_CALLABLES[tok.value], node)
        if tok.kind == "name" and tok.value == "attr":
            self.pos += 1
            node = _attr_node(node, self.expect_name("an attribute name after 'attr'"))
            return self.postfixes(node)
        raise self.error(f"expected one of {_CALLABLE_NAMES}, attr after '|'", tok)

    def unary(self) -> _Eval:
        tok = self.peek()
        if tok.kind == "name" and self.peek(1).kind == "op" and self.peek(1).value == "(":
            if tok.value not in _CALLABLES:
                raise self.not_callable(tok, self.peek(1))
            self.pos += 2
            inner = self.expression()
            self.expect_op(")")
            node = _call_node(_CALLABLES[tok.value], inner)
        elif tok.kind == "name" and tok.value in _CALLABLES:
            raise self.error(f"expected '(' after '{tok.value}'", self.peek(1))
        elif tok.kind == "name":
            self.pos += 1
            node = self.operand(tok)
        elif tok.kind == "op" and tok.value == "(":
            self.pos += 1
            node = self.expression()
            self.expect_op(")")
        else:
            raise self.error("expected a parameter name, args, kwargs, this, self, return or a call", tok)
        return self.postfixes(node)

    def not_callable(self, callee: _Token, paren: _Token) -> ExpressionError:
        hint = f"only {_CALLABLE_NAMES} can be called"
        if callee.kind == "name":
            return ExpressionError(f"'{callee.value}' cannot be called", self.source, callee.column, hint)
        return ExpressionError("unexpected '('", self.source, paren.column, hint)

    def postfixes(self, node: _Eval) -> _Eval:
        callee = self.tokens[self.pos - 1]  # what a following '(' would call: a name, ']' or ')'
        while True:
            tok = self.peek()
            if tok.kind != "op":
                return node
            if tok.value == ".":
                self.pos += 1
                node = _attr_node(node, self.expect_name("an attribute name after '.'"))
            elif tok.value == "[":
                self.pos += 1
                node = self.subscript(node)
            elif tok.value == "(":
                raise self.not_callable(callee, tok)
            else:
                return node
            callee = self.tokens[self.pos - 1]

    def subscript(self, node: _Eval) -> _Eval:
        tok = self.peek()
        if tok.kind == "str":
            self.pos += 1
            self.expect_op("]")
            return _item_node(node, tok.value)
        start: int | None = None
        if tok.kind == "int":
            self.pos += 1
            start = tok.value
        elif not self.at_op(":"):
            raise self.error("expected an integer, a string or ':' after '['", tok)
        if not self.at_op(":"):
            self.expect_op("]")
            return _item_node(node, start)
        self.pos += 1
        stop: int | None = None
        if self.peek().kind == "int":
            stop = self.peek().value
            self.pos += 1
        self.expect_op("]")
        return _item_node(node, slice(start, stop))

    def operand(self, tok: _Token) -> _Eval:
        name = tok.value
        if name == "args":
            return _read_args
        if name == "kwargs":
            return _read_kwargs
        if name in ("this", "self"):
            return lambda a, k, r: a[0]
        if name == "return":
            self.uses_return = True
            return _read_return
        name = self.checked_name(tok)
        if self.signature is None:
            return _kwarg_node(name)
        params = list(self.signature.parameters.values())
        # Names a keyword argument binds to; anything else passed by keyword lands in **kwargs.
        named = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        for position, param in enumerate(params):
            if param.name == name:
                return _parameter_node(param, position, named)
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            return _kwarg_node(name)
        listed = ", ".join(p.name for p in params) or "(none)"
        raise ExpressionError(f"unknown name '{name}'", self.source, tok.column, f"parameters are: {listed}")
