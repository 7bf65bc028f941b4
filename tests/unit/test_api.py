import inspect

import pinnace
from pinnace import errors


def test_all_is_complete():
    public = {n for n, v in vars(pinnace).items()
              if not n.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v))}
    assert public <= set(pinnace.__all__)
    assert set(pinnace._WHERE) <= set(pinnace.__all__)
    for name in pinnace.__all__:
        assert hasattr(pinnace, name)  # each lazily imported name resolves


def test_every_error_is_a_pinnace_error_and_drawn_in_the_tree():
    doc = errors.__doc__
    for name, cls in vars(errors).items():
        if inspect.isclass(cls) and issubclass(cls, Exception) and cls.__module__ == errors.__name__:
            assert issubclass(cls, errors.PinnaceError)
            assert name in doc, f"{name} is missing from the tree in errors.py"


def test_errors_carry_fields():
    e = errors.StateError("vm", "stop", "created", ["ready", "running"])
    assert (e.state, e.allowed) == ("created", ("ready", "running"))
    e = errors.BootTimeout("vm", 5, log_tail="line1\nline2")
    assert e.timeout == 5 and "line2" in str(e)
    e = errors.MachineCrashed("vm", 137, during="boot")
    assert "SIGKILL" in str(e) and e.exit_code == 137
