"""The command line as Hydra would read it, checked first: each mistake is one line naming the override."""

from __future__ import annotations

import pytest

from moe_trainer.cli import CONF_DIR
from moe_trainer.config.command_line import check_command_line
from moe_trainer.config.errors import OverrideError

REFUSED = [
    (["moe.num_expert=4"], "moe.num_expert=4: no such setting; did you mean moe.num_experts?"),
    (["+moe.num_expert=4"], "+moe.num_expert=4: no such setting; did you mean moe.num_experts?"),
    (["++moe.num_expert=4"], "++moe.num_expert=4: no such setting; did you mean moe.num_experts?"),
    (["+moe.num_experts=4"], "+moe.num_experts=4: moe.num_experts is a setting already: drop the +"),
    (["data.paths=/x.txt"], "data.paths=/x.txt: data.paths is a list: write data.paths=[/x.txt]"),
    (["data.paths=/a.txt,/b.txt"], "write data.paths=[/a.txt,/b.txt]"),
    (["data.paths=[~/x.txt]"], """quote list items with special characters: 'data.paths=["~/x.txt"]'"""),
    (["moe.top_k=two"], "moe.top_k=two: Value 'two' of type 'str' could not be converted to Integer"),
    (["moe.top_k"], "moe.top_k: cannot be parsed"),
    (["parallel=ring_allreduce"], "parallel=ring_allreduce: no such option of parallel; choose one of "
                                  "data_parallel, disaggregated, expert_parallel, single"),
    (["experiment=debgu"], "did you mean experiment=debug?"),  # optional group: Hydra skips it silently
    (["parallel=single,data_parallel"], "parallel=single,data_parallel: a comma makes a sweep: add -m to run one "
                                        "job per option"),  # a group takes no list: only -m is a fix
    (["moe.top_k=1,2"], "a comma makes a sweep: add -m to sweep, write 'moe.top_k=[1,2]'"),
    (["parallel=expert_paralel"], "did you mean parallel=expert_parallel?"),
    (["-m", "parallel=single,ring"], "parallel=single,ring: no such option of parallel"),
    (["-m", "moe.num_expert=4,8"], "did you mean moe.num_experts?"),
    (["-m", "moe.top_k=1,two"], "moe.top_k=1,two: Value 'two'"),
    (["--cfg", "job", "moe.num_expert=4"], "did you mean moe.num_experts?"),
    (["experiment=null"], "experiment=null: Config group override must be a string or a list"),
]


@pytest.mark.parametrize("argv,expected", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_mistakes_are_one_line_naming_the_override(argv: list[str], expected: str) -> None:
    with pytest.raises(OverrideError) as err:
        check_command_line(argv, CONF_DIR)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("value", ["xyz", "gpu", "ray", "dp"])
def test_an_unrelated_option_gets_the_choices_but_no_guess(value: str) -> None:
    """The shared ``parallel=`` prefix must not make every option look like the nearest one."""
    with pytest.raises(OverrideError) as err:
        check_command_line([f"parallel={value}"], CONF_DIR)
    assert "choose one of" in str(err.value) and "did you mean" not in str(err.value)


@pytest.mark.parametrize("argv", [
    [],
    ["experiment=debug", "moe.num_experts=16", "data.paths=[/x.txt]", "hydra.run.dir=/tmp/x", "logger.tags=[a,b]"],
    ["-m", "parallel=single,data_parallel", "moe.top_k=1,2", "experiment=debug"],
    ["--cfg", "job", "moe.num_experts=16"],
    ["--help"],
    ["--info", "defaults"],
])
def test_good_command_lines_pass(argv: list[str]) -> None:
    check_command_line(argv, CONF_DIR)  # a missing data file is validation's business, not the command line's
