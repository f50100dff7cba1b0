import pytest
import timm

import methods
from methods import TokenBenchError
from methods.config import ReductionConfig
from methods.registry import register


def test_foundation_methods_are_registered():
    assert {"vanilla", "evit", "prune"} <= set(methods.list_methods())


def test_unknown_method_lists_known_names(deit_tiny):
    with pytest.raises(TokenBenchError, match="unknown method 'nonexistent'.*evit.*prune.*tome.*vanilla"):
        methods.apply(deit_tiny, "nonexistent")
    with pytest.raises(TokenBenchError) as error:
        methods.lookup("nope")
    for name in methods.list_methods():
        assert name in str(error.value)


def test_registering_a_name_twice_raises():
    with pytest.raises(ValueError, match="registered twice"):
        register("evit", config=ReductionConfig)(lambda model, config: None)


def test_unknown_option_names_the_allowed_ones(deit_tiny):
    with pytest.raises(TokenBenchError, match="no option 'keep'.*keep_rate, locations"):
        methods.apply(deit_tiny, "evit", keep=0.5)


def test_defaults_are_the_papers():
    assert methods.lookup("evit").defaults() == {"keep_rate": 0.7, "locations": (3, 6, 9)}
    assert methods.lookup("prune").defaults() == {"keep_rate": 0.7, "locations": (3, 6, 9)}


@pytest.mark.parametrize("name", methods.list_methods())
def test_every_option_a_method_adds_is_documented(name):
    """bench list shows these under the defaults: an option added without a line would show bare."""
    spec = methods.lookup(name)
    added = set(spec.defaults()) - {"keep_rate", "locations"}
    assert added <= set(spec.option_docs())
    assert all(text and not text.startswith(" ") for text in spec.option_docs().values())


def test_option_docs_follow_their_continuation_lines():
    docs = methods.lookup("tome").option_docs()
    assert list(docs) == ["keep_rate", "locations", "r", "prop_attn"]
    assert docs["r"].endswith("half the mergeable tokens); neither r nor keep_rate given: 13.")
    assert methods.lookup("evit").option_docs() == {}


@pytest.mark.parametrize("name", ["evit", "prune", "vanilla"])
@pytest.mark.parametrize("keep_rate", [0, -0.1, 1.5, "0.5", True])
def test_keep_rate_outside_range_is_refused(deit_tiny, name, keep_rate):
    with pytest.raises(TokenBenchError, match=r"keep_rate must be a number in \(0, 1\]"):
        methods.apply(deit_tiny, name, keep_rate=keep_rate)


@pytest.mark.parametrize("locations", [(3, 12), (11, 12, 40)])
def test_location_beyond_depth_is_refused(deit_tiny, locations):
    with pytest.raises(TokenBenchError, match=r"beyond the model's depth: blocks are numbered 0..11"):
        methods.apply(deit_tiny, "evit", locations=locations)


@pytest.mark.parametrize("locations", [(6, 3), (3, 3), (-1,), (1.5,)])
def test_malformed_locations_are_refused(deit_tiny, locations):
    with pytest.raises(TokenBenchError, match="locations must"):
        methods.apply(deit_tiny, "prune", locations=locations)


def test_non_vit_model_is_refused():
    resnet = timm.create_model("resnet10t")
    with pytest.raises(TokenBenchError, match="timm VisionTransformer models.*got ResNet"):
        methods.apply(resnet, "evit")


def test_applying_twice_is_refused(deit_tiny):
    methods.apply(deit_tiny, "evit")
    with pytest.raises(TokenBenchError, match="already has method 'evit' applied"):
        methods.apply(deit_tiny, "prune")


def test_refused_call_leaves_the_model_untouched(deit_tiny):
    with pytest.raises(TokenBenchError):
        methods.apply(deit_tiny, "evit", locations=(3, 30))
    methods.apply(deit_tiny, "prune")  # still patchable: nothing was half-applied
    assert methods.token_counts(deit_tiny, 224)[3] == 1 + 138
