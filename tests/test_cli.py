"""How the training tools end: ``beit3.cli.startup.exit_code`` maps a finished run to 0, a configuration error to 2
and a stopped run or an unusable checkpoint to 3, each with one line on stderr."""
import pytest

from beit3.cli.startup import exit_code
from beit3.errors import CheckpointError, ConfigError, DataFaultError, NonFiniteLossError


def _raise(err):
    def work():
        raise err
    return work


@pytest.mark.parametrize("err,code", [(ConfigError("config key 'optim.lr' must be > 0"), 2),
                                      (NonFiniteLossError("non-finite for 10 steps"), 3),
                                      (DataFaultError("data fault at step 7"), 3),
                                      (CheckpointError("'x.pth' is not a checkpoint"), 3)])
def test_exit_codes_name_the_error_in_one_line(err, code, capsys):
    assert exit_code(_raise(err)) == code
    assert capsys.readouterr().err == f"error: {err}\n"


def test_a_finished_run_exits_0_and_other_errors_propagate():
    assert exit_code(lambda: None) == 0
    with pytest.raises(KeyError):
        exit_code(_raise(KeyError("a bug, not a user error")))
