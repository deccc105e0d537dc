"""Issue #29: the run's config followed through the calls of a tiny run (benchmarks/config_trace.py)."""
import pytest

from benchmarks.config_trace import summarize, trace_tiny_run


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    tracer = trace_tiny_run(tmp_path_factory.mktemp("config_trace"), steps=1)
    return tracer, summarize(tracer.calls, tracer.first_step_at)


def test_the_tracer_sees_the_run_and_its_first_step(trace):
    tracer, s = trace
    assert tracer.first_step_at is not None and 0 < tracer.first_step_at < len(tracer.calls)
    assert tracer.calls[0].module == "minidb.dreambooth.train" and tracer.calls[0].function == "train"
    assert tracer.calls[tracer.first_step_at].function == "TrainStep.begin"


def test_the_plan_is_made_once_before_the_first_step(trace):
    tracer, s = trace
    made = [i for i, c in enumerate(tracer.calls) if c.function == "make_plan"]
    assert len(made) == 1 and made[0] < tracer.first_step_at


def test_the_config_side_is_entered_once_from_the_rest_of_the_run(trace):
    """plan.py resolves the run and train_config.py is its schema: after train() calls make_plan, nothing
    else in the run calls into either (config.toml and the states' record come from the plan)."""
    tracer, s = trace
    assert s["config_side_calls"] == ["make_plan"], s["config_side_calls"]
    assert s["train_config_before"] <= 2 and s["plan_before"] <= 2  # both inside make_plan
