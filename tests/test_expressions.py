"""Tests for service_profiler.runtime.expressions: parsing, binding, safety, evaluation errors."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from service_profiler.runtime.expressions import (
    MISSING,
    STR_LIMIT,
    CompiledExpression,
    ExpressionError,
    ExpressionEvalError,
    compile_expression,
)

# ---------------------------------------------------------------- small real objects


@dataclass
class Sequence:
    input_ids: list[int]


@dataclass
class InputBatch:
    req_ids: list[str]
    _req_ids: list[str]


@dataclass
class Runner:
    device: str = "cuda:0"
    dp_rank: int = 1
    input_batch: InputBatch = field(default_factory=lambda: InputBatch(["a", "b", "c"], ["x", "y"]))

    def execute_model(self, scheduler_output: object, intermediate_tensors: object = None) -> object:
        return scheduler_output


@dataclass
class Bag:
    items: list[int]


class Counting:
    """Counts every call of bump() and of __getattr__, so tests can prove nothing ran."""

    def __init__(self) -> None:
        self.bumps = 0
        self.getattr_calls = 0
        self.value = 7

    def bump(self) -> int:
        self.bumps += 1
        return self.bumps

    def __getattr__(self, name: str) -> Any:
        self.getattr_calls += 1
        return 42


class Guarded:
    """A class whose __getattribute__ lies; the expression must see the real attribute."""

    def __init__(self) -> None:
        self.secret = "real"

    def __getattribute__(self, name: str) -> Any:
        return "intercepted"


def forward(self: object, input_ids: list[int], positions: list[int] | None = None) -> None:
    return None


FORWARD = inspect.signature(forward)


def ev(
    source: str,
    *args: Any,
    result: object = MISSING,
    signature: inspect.Signature | None = None,
    **kwargs: Any,
) -> object:
    return compile_expression(source, signature).evaluate(args, kwargs, result)


# ---------------------------------------------------------------- documented examples


def test_documented_len_of_parameter() -> None:
    assert ev("len(input_ids)", object(), [1, 2, 3], signature=FORWARD) == 3


def test_documented_len_of_return_as_str() -> None:
    assert ev("len(return) | str", result=[1, 2, 3, 4]) == "4"


def test_documented_return_index_attr_len() -> None:
    result = [Sequence([1, 2, 3, 4, 5]), Sequence([1])]
    assert ev("return[0] | attr input_ids | len", result=result) == 5


def test_documented_args0_device_str() -> None:
    signature = inspect.signature(Runner.execute_model)
    assert ev("args[0] | attr device | str", Runner(), None, signature=signature) == "cuda:0"
    assert ev("args[0] | attr dp_rank | str", Runner(), None, signature=signature) == "1"


def test_documented_batch_size_through_private_attr() -> None:
    signature = inspect.signature(Runner.execute_model)
    assert ev("args[0] | attr input_batch | attr _req_ids | len", Runner(), None, signature=signature) == 2
    assert ev("args[0] | attr input_batch | attr req_ids | len", Runner(), None, signature=signature) == 3


def test_documented_kwargs_key() -> None:
    assert ev("kwargs['batch_size']", batch_size=8) == 8


def test_documented_tensor_shape() -> None:
    signature = inspect.signature(lambda input_tensor: None)
    assert ev("input_tensor | attr shape | str", np.zeros((2, 3)), signature=signature) == "(2, 3)"


@pytest.mark.parametrize(("value", "expected"), [(1, True), (0, False), ("", False), ([0], True)])
def test_documented_training_bool(value: object, expected: bool) -> None:
    signature = inspect.signature(lambda self, training: None)
    assert ev("training | bool", object(), value, signature=signature) is expected


def test_documented_data_items_len_str() -> None:
    signature = inspect.signature(lambda data: None)
    assert ev("data | attr items | len | str", Bag([1, 2, 3]), signature=signature) == "3"


def test_data_items_on_a_dict_is_the_bound_method_so_len_fails() -> None:
    # `attr items` reads the attribute: on a dict that is the method, which has no len.
    signature = inspect.signature(lambda data: None)
    with pytest.raises(ExpressionEvalError, match="TypeError"):
        ev("data | attr items | len", {"a": 1}, signature=signature)


@pytest.mark.parametrize("name", ["exec_time", "input_file", "compile_flags", "evaluate", "import_path"])
def test_names_with_formerly_blacklisted_substrings_are_ordinary(name: str) -> None:
    signature = inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)])
    assert ev(f"len({name})", [1, 2], signature=signature) == 2


# ---------------------------------------------------------------- operands


def test_args_is_the_whole_positional_tuple_including_self() -> None:
    runner = Runner()
    assert ev("args", runner, 5) == (runner, 5)
    assert ev("args[0]", runner, 5) is runner
    assert ev("args[1]", runner, 5) == 5
    assert ev("args[-1]", runner, 5) == 5
    assert ev("args[-2] | attr dp_rank", runner, 5) == 1


def test_kwargs_operand_and_both_quote_styles() -> None:
    assert ev("kwargs", a=1) == {"a": 1}
    assert ev("kwargs['k']", k="single") == "single"
    assert ev('kwargs["k"]', k="double") == "double"
    assert compile_expression("kwargs['a b']").evaluate((), {"a b": 3}) == 3
    assert compile_expression(r"kwargs['it\'s']").evaluate((), {"it's": 4}) == 4


def test_this_and_self_are_args0() -> None:
    runner = Runner()
    assert ev("this", runner) is runner
    assert ev("self", runner) is runner
    assert ev("this.device", runner) == "cuda:0"
    assert ev("self | attr device", runner) == "cuda:0"


def test_return_operand_and_uses_return() -> None:
    assert compile_expression("return").uses_return is True
    assert compile_expression("len(return[0])").uses_return is True
    assert compile_expression("args[0]").uses_return is False
    assert ev("return", result=None) is None
    assert ev("return['key']", result={"key": "v"}) == "v"


def test_return_without_result_is_an_eval_error() -> None:
    expr = compile_expression("len(return)")
    with pytest.raises(ExpressionEvalError, match=r'cannot evaluate "len\(return\)".*has not returned'):
        expr.evaluate((), {})
    assert expr.evaluate((), {}, [1]) == 1


# ---------------------------------------------------------------- postfixes


def test_postfix_attribute_index_and_key() -> None:
    data = {"seqs": [Sequence([1, 2]), Sequence([3, 4, 5])]}
    assert ev("this['seqs'][1].input_ids[-1]", data) == 5
    assert ev('this["seqs"][0].input_ids', data) == [1, 2]
    assert ev("this . items", Bag([9])) == [9]  # whitespace between tokens is allowed


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("this[1:3]", [1, 2]),
        ("this[:2]", [0, 1]),
        ("this[3:]", [3, 4]),
        ("this[-2:]", [3, 4]),
        ("this[:-3]", [0, 1]),
        ("this[:]", [0, 1, 2, 3, 4]),
        ("this[-4:-2]", [1, 2]),
        ("args[1:]", (1, 2)),
    ],
)
def test_slices(source: str, expected: object) -> None:
    assert ev(source, [0, 1, 2, 3, 4], 1, 2) == expected


def test_parenthesized_expression_takes_postfixes() -> None:
    assert ev("(this | attr input_ids)[1]", Sequence([5, 6])) == 6
    assert ev("str(this)[:3]", "abcdef") == "abc"


# ---------------------------------------------------------------- calls and pipes


@pytest.mark.parametrize(
    ("source", "value", "expected"),
    [
        ("len(this)", [1, 2, 3], 3),
        ("str(this)", 12, "12"),
        ("int(this)", "42", 42),
        ("int(this)", 3.9, 3),
        ("float(this)", "2.5", 2.5),
        ("bool(this)", [], False),
        ("this | len", "abcd", 4),
        ("this | str", 1.5, "1.5"),
        ("this | int", "-7", -7),
        ("this | float", 2, 2.0),
        ("this | bool", 1, True),
        ("this | len | str", [1, 2], "2"),
        ("str(len(this))", [1, 2], "2"),
        ("len(this | attr input_ids)", Sequence([1, 2, 3]), 3),
        ("this | attr input_ids | len | str | len", Sequence(list(range(12))), 2),
    ],
)
def test_calls_and_pipes(source: str, value: object, expected: object) -> None:
    result = ev(source, value)
    assert result == expected
    assert type(result) is type(expected)


def test_attr_pipe_takes_dotted_names_and_postfixes() -> None:
    runner = Runner()
    assert ev("this | attr input_batch.req_ids", runner) == ["a", "b", "c"]
    assert ev("this | attr input_batch.req_ids[-1]", runner) == "c"
    assert ev("this | attr input_batch | attr req_ids[0:2] | len", runner) == 2


def test_str_is_truncated() -> None:
    assert ev("str(this)", "x" * 10_000) == "x" * STR_LIMIT
    assert ev("this | str", list(range(10_000))) == str(list(range(10_000)))[:STR_LIMIT]
    assert ev("this | str", "short") == "short"


def test_parameter_may_be_named_attr() -> None:
    signature = inspect.signature(lambda attr: None)
    assert ev("attr | len", [1, 2], signature=signature) == 2


# ---------------------------------------------------------------- compile errors


@pytest.mark.parametrize(
    ("source", "column", "expected"),
    [
        ("len(abc", 8, "expected ')'"),
        ("", 1, "expected a parameter name"),
        ("x |", 4, "expected one of len, str, int, float, bool, attr"),
        ("x | foo", 5, "expected one of len, str, int, float, bool, attr"),
        ("x | attr", 9, "expected an attribute name after 'attr'"),
        ("x.", 3, "expected an attribute name after '.'"),
        ("x.1", 3, "expected an attribute name after '.'"),
        ("args[", 6, "expected an integer, a string or ':'"),
        ("args[0", 7, "expected ']'"),
        ("args[x]", 6, "expected an integer, a string or ':'"),
        ("args[1:2:3]", 9, "expected ']'"),
        ("args['a':]", 9, "expected ']'"),
        ("args[0] attr x", 9, "expected '|' or end of expression"),
        ("kwargs['k", 10, "expected closing '"),
        ("x @ y", 3, "unexpected character '@'"),
        ("len", 4, "expected '(' after 'len'"),
        ("len(x))", 7, "expected '|' or end of expression"),
        ("(x", 3, "expected ')'"),
        ("'a\\n'", 3, "unsupported escape"),
        ("args[- 1]", 6, "unexpected character '-'"),
    ],
)
def test_compile_errors_name_column_and_expectation(source: str, column: int, expected: str) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression(source)
    err = info.value
    assert err.column == column
    assert err.source == source
    assert expected in err.message
    assert f'at column {column} in "{source}"' in str(err)


def test_compile_error_mentions_what_was_found() -> None:
    with pytest.raises(ExpressionError, match=r"""^expected '\)' at column 8 in "len\(abc"; found end of"""):
        compile_expression("len(abc")
    with pytest.raises(ExpressionError, match="found 'attr'"):
        compile_expression("args[0] attr x")


def test_expression_error_is_a_value_error() -> None:
    assert issubclass(ExpressionError, ValueError)


def test_deep_nesting_is_a_compile_error_not_a_recursion_error() -> None:
    with pytest.raises(ExpressionError, match="nested deeper"):
        compile_expression("(" * 100 + "x" + ")" * 100)
    assert ev("(" * 20 + "this" + ")" * 20, 5) == 5


@pytest.mark.parametrize(
    "source",
    [
        "this.__class__",
        "args[0] | attr __dict__",
        "__import__",
        "this | attr a.__class__",
        "this.__x",
        "len(this.__len__)",
    ],
)
def test_dunder_and_double_underscore_names_are_rejected(source: str) -> None:
    with pytest.raises(ExpressionError, match="names starting with '__'"):
        compile_expression(source)


@pytest.mark.parametrize(
    ("source", "column", "callee"),
    [
        ("len(this.bump())", 10, "'bump'"),
        ("this.bump()", 6, "'bump'"),
        ("foo(this)", 1, "'foo'"),
        ("getattr(this, 'bump')", 1, "'getattr'"),
        ("eval('1')", 1, "'eval'"),
        ("this(1)", 1, "'this'"),
        ("return()", 1, "'return'"),
        ("args[0]()", 8, "unexpected '('"),
        ("len(this)(1)", 10, "unexpected '('"),
    ],
)
def test_only_the_five_builtins_can_be_called(source: str, column: int, callee: str) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression(source)
    assert info.value.column == column
    assert callee in info.value.message
    assert "only len, str, int, float, bool can be called" in str(info.value)


def test_rejected_call_never_runs_and_reading_a_method_does_not_call_it() -> None:
    target = Counting()
    with pytest.raises(ExpressionError):
        compile_expression("len(this.bump())")
    bound = ev("this.bump", target)
    assert callable(bound)
    assert target.bumps == 0
    assert ev("this.value | str", target) == "7"
    assert target.bumps == 0


def test_user_getattr_is_never_invoked() -> None:
    target = Counting()
    for source in ("this.missing", "this | attr missing", "this.value.missing"):
        with pytest.raises(ExpressionEvalError, match="AttributeError"):
            ev(source, target)
    assert target.getattr_calls == 0
    assert target.missing == 42  # the counter works: ordinary attribute access does call it
    assert target.getattr_calls == 1


def test_user_getattribute_is_bypassed() -> None:
    assert ev("this.secret", Guarded()) == "real"


# ---------------------------------------------------------------- signature binding


def target(self: object, a: int, b: int = 20, /, c: int = 30, *rest: int, d: int = 40, **extra: int) -> None:
    return None


TARGET = inspect.signature(target)


def test_binding_by_position_keyword_and_default() -> None:
    expr_c = compile_expression("c", FORWARD_C := inspect.signature(lambda self, a, c=30: None))
    assert expr_c.evaluate((None, 1, 3), {}) == 3  # by position
    assert expr_c.evaluate((None, 1), {"c": 5}) == 5  # by keyword
    assert expr_c.evaluate((None, 1), {}) == 30  # default
    assert compile_expression("a", FORWARD_C).evaluate((None,), {"a": 9}) == 9


def test_binding_all_parameter_kinds() -> None:
    args = (object(), 1, 2, 3, 4, 5)
    kwargs = {"d": 6, "e": 7, "f": 8}
    got = {name: compile_expression(name, TARGET).evaluate(args, kwargs) for name in "abcd"}
    assert got == {"a": 1, "b": 2, "c": 3, "d": 6}
    assert compile_expression("rest", TARGET).evaluate(args, kwargs) == (4, 5)
    assert compile_expression("extra", TARGET).evaluate(args, kwargs) == {"e": 7, "f": 8}
    assert compile_expression("e", TARGET).evaluate(args, kwargs) == 7  # falls into **extra
    short = (object(), 1)
    assert compile_expression("b", TARGET).evaluate(short, {"b": 99}) == 20  # positional-only: not by keyword
    assert compile_expression("d", TARGET).evaluate(short, {}) == 40  # keyword-only default


def test_var_keyword_keeps_keywords_named_like_positional_only_parameters() -> None:
    signature = inspect.signature(lambda a, /, b=0, **kw: None)
    expr = compile_expression("kw", signature)
    assert expr.evaluate((1,), {"a": 2, "b": 3, "z": 4}) == {"a": 2, "z": 4}
    assert compile_expression("a", signature).evaluate((1,), {"a": 2}) == 1


def test_binding_method_signature_counts_self() -> None:
    signature = inspect.signature(Runner.execute_model)
    runner, output = Runner(), Sequence([1, 2])
    expr = compile_expression("scheduler_output.input_ids | len", signature)
    assert expr.evaluate((runner, output), {}) == 2
    assert expr.evaluate((runner,), {"scheduler_output": output}) == 2
    assert compile_expression("intermediate_tensors", signature).evaluate((runner, output), {}) is None


def test_unknown_name_is_a_compile_error_listing_parameters() -> None:
    signature = inspect.signature(lambda a, b: None)
    with pytest.raises(ExpressionError) as info:
        compile_expression("len(x)", signature)
    assert info.value.column == 5
    assert "unknown name 'x'" in str(info.value)
    assert "parameters are: a, b" in str(info.value)


def test_without_signature_names_are_read_from_kwargs() -> None:
    expr = compile_expression("len(input_ids)")
    assert expr.evaluate((), {"input_ids": [1, 2]}) == 2
    with pytest.raises(ExpressionEvalError, match="'input_ids' was not passed by keyword"):
        expr.evaluate(([1, 2],), {})


def test_missing_required_argument_is_an_eval_error() -> None:
    expr = compile_expression("a", inspect.signature(lambda self, a: None))
    with pytest.raises(ExpressionEvalError, match="argument 'a' was not passed"):
        expr.evaluate((None,), {})


# ---------------------------------------------------------------- evaluation errors


class Exploding:
    @property
    def boom(self) -> int:
        raise RuntimeError("property failed")


class BadMessage(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message either")


class RaisesBadMessage:
    @property
    def boom(self) -> int:
        raise BadMessage()


@pytest.mark.parametrize(
    ("source", "value", "cause"),
    [
        ("args[5]", 1, IndexError),
        ("this[9]", [1], IndexError),
        ("kwargs['nope']", 1, KeyError),
        ("this['nope']", {}, KeyError),
        ("this.nope", 1, AttributeError),
        ("len(this)", 5, TypeError),
        ("this[0]", 5, TypeError),
        ("int(this)", "x", ValueError),
        ("float(this)", "x", ValueError),
        ("this.boom", Exploding(), RuntimeError),
    ],
)
def test_eval_errors_are_wrapped_with_source(source: str, value: object, cause: type[Exception]) -> None:
    expr = compile_expression(source)
    with pytest.raises(ExpressionEvalError) as info:
        expr.evaluate((value,), {})
    assert info.value.source == source
    assert f'cannot evaluate "{source}"' in str(info.value)
    assert isinstance(info.value.cause, cause)
    assert info.value.__cause__ is info.value.cause


def test_this_without_arguments_is_an_eval_error() -> None:
    with pytest.raises(ExpressionEvalError, match="IndexError"):
        compile_expression("this").evaluate((), {})


def test_exception_with_broken_str_is_still_wrapped() -> None:
    with pytest.raises(ExpressionEvalError, match="BadMessage: <unprintable>"):
        compile_expression("this.boom").evaluate((RaisesBadMessage(),), {})


# ---------------------------------------------------------------- the compiled object


def test_compiled_expression_is_frozen_and_reusable() -> None:
    expr = compile_expression("len(return) | str")
    assert isinstance(expr, CompiledExpression)
    assert expr.source == "len(return) | str"
    with pytest.raises(dataclasses.FrozenInstanceError):
        expr.source = "other"  # type: ignore[misc]
    assert [expr.evaluate((), {}, list(range(n))) for n in (1, 2, 3)] == ["1", "2", "3"]
    assert repr(MISSING) == "MISSING"
