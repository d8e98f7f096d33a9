"""Tests of the anatomy ontology: the packaged tree, and the helpers on a tiny hand-checked tree."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from echocare.ontology import AnatomyOntology, UnknownAnatomyError, load_ontology
from echocare.ontology.ontology import DEFAULT_ONTOLOGY_PATH

REQUIRED = [
    "thorax/breast",
    "thorax/heart/apical four-chamber",
    "thorax/heart/apical two-chamber",
    "head & neck/thyroid",
    "head & neck/carotid artery",
    "abdomen/liver",
    "abdomen/kidney",
    "abdomen/pancreas",
    "abdomen/spleen",
    "pelvis/bladder",
    "fetus/fetal head",
    "fetus/fetal brain",
    "fetus/fetal heart/four-chamber view",
    "lower limb/femoral vessels",
    "other",
]
REGIONS = ["head & neck", "thorax", "abdomen", "pelvis", "back", "upper limb", "lower limb", "fetus", "other"]

# The tiny tree used for hand-computed values:
#   0 a          5 b
#   1 a/x        6 b/z
#   2 a/x/s
#   3 a/x/t
#   4 a/y
TINY = ["a", "a/x", "a/x/s", "a/x/t", "a/y", "b", "b/z"]
#                     a    a/x  a/x/s a/x/t a/y   b    b/z
TINY_SCORES = [0.9, 0.6, 0.8, 0.2, 0.3, 0.4, 0.7]


@pytest.fixture(scope="module")
def onto() -> AnatomyOntology:
    return load_ontology()


@pytest.fixture()
def tiny(tmp_path: Path) -> AnatomyOntology:
    text = "# tiny test tree\n" + "".join(f'- {{index: {i}, path: "{p}"}}\n' for i, p in enumerate(TINY))
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return load_ontology(path)


# ----------------------------------------------------------------------------- packaged tree
def test_required_paths_exist(onto: AnatomyOntology) -> None:
    for path in REQUIRED:
        assert path in onto.nodes, path
        assert onto.index(path) == onto.nodes.index(path)
    assert [onto.nodes[i] for i in onto.regions()] == REGIONS


def test_file_indices_in_order_and_parents_first() -> None:
    text = DEFAULT_ONTOLOGY_PATH.read_text()
    assert "append" in text.split("- {")[0].lower()  # the header states the append-only rule
    entries = yaml.safe_load(text)
    assert [e["index"] for e in entries] == list(range(len(entries)))
    seen: set[str] = set()
    for e in entries:
        path = e["path"]
        assert path == path.lower().strip() and "//" not in path and not path.endswith("/")
        if "/" in path:
            assert path.rsplit("/", 1)[0] in seen, f"parent of {path} comes after it"
        seen.add(path)
    onto = load_ontology()
    assert onto.nodes == [e["path"] for e in entries]
    assert all(onto.parent[i] < i for i in range(onto.num_nodes))


def test_counts_by_level(onto: AnatomyOntology) -> None:
    regions, organs, structures = onto.level_counts()
    assert regions == 9
    assert 40 <= organs <= 60
    assert 50 <= structures <= 70
    assert onto.num_nodes == regions + organs + structures == len(onto.nodes)
    assert max(onto.depth) == 2
    assert all((p == -1) == (d == 0) for p, d in zip(onto.parent, onto.depth))


def test_tree_navigation(onto: AnatomyOntology) -> None:
    thorax, heart = onto.index("thorax"), onto.index("thorax/heart")
    a4c = onto.index("thorax/heart/apical four-chamber")
    assert onto.parent[a4c] == heart and onto.parent[heart] == thorax and onto.parent[thorax] == -1
    assert onto.depth[thorax] == 0 and onto.depth[heart] == 1 and onto.depth[a4c] == 2
    assert onto.ancestors(a4c) == [thorax, heart]
    assert onto.ancestors(thorax) == []
    assert a4c in onto.children(heart) and heart in onto.children(thorax)
    assert set(onto.descendants(thorax)) >= {heart, a4c, onto.index("thorax/breast")}
    assert onto.descendants(a4c) == []
    # normalisation of case, whitespace and trailing slash
    assert onto.index("  Thorax /  Heart/Apical   Four-Chamber/ ") == a4c
    assert load_ontology() is onto  # cached


def test_ancestor_matrix(onto: AnatomyOntology) -> None:
    anc = onto.ancestor_matrix()
    assert anc.dtype == torch.bool and anc.shape == (onto.num_nodes, onto.num_nodes)
    for i in range(onto.num_nodes):
        assert set(torch.nonzero(anc[i]).flatten().tolist()) == set(onto.ancestors(i)) | {i}
        assert set(torch.nonzero(anc.T[i]).flatten().tolist()) == set(onto.descendants(i)) | {i}


def test_label_vector_levels(onto: AnatomyOntology) -> None:
    n = onto.num_nodes
    thorax, heart = onto.index("thorax"), onto.index("thorax/heart")
    a4c = onto.index("thorax/heart/apical four-chamber")
    a2c = onto.index("thorax/heart/apical two-chamber")
    liver = onto.index("abdomen/liver")

    labels, known = onto.label_vector("thorax")  # region
    assert labels.dtype == np.float32 and known.dtype == bool and labels.shape == known.shape == (n,)
    assert np.flatnonzero(labels).tolist() == [thorax]
    assert np.flatnonzero(~known).tolist() == onto.descendants(thorax)
    assert known[liver] and labels[liver] == 0 and known[thorax]

    labels, known = onto.label_vector("thorax/heart")  # organ
    assert np.flatnonzero(labels).tolist() == [thorax, heart]
    assert np.flatnonzero(~known).tolist() == onto.descendants(heart)
    assert not known[a4c] and not known[a2c]
    assert known[onto.index("thorax/breast")] and labels[onto.index("thorax/breast")] == 0

    labels, known = onto.label_vector("Thorax/Heart/Apical Four-Chamber")  # structure
    assert np.flatnonzero(labels).tolist() == [thorax, heart, a4c]
    assert known.all()
    assert labels[a2c] == 0

    for empty in (None, ""):
        labels, known = onto.label_vector(empty)
        assert not labels.any() and not known.any()

    batch_labels, batch_known = onto.label_batch(["thorax", None])
    assert batch_labels.shape == batch_known.shape == (2, n)
    assert batch_known[0].sum() == n - len(onto.descendants(thorax)) and not batch_known[1].any()


def test_coherent_scores_random_never_child_above_parent(onto: AnatomyOntology) -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 3, onto.num_nodes, generator=g)
    out = onto.coherent_scores(scores)
    assert out.shape == scores.shape
    for child, parent in enumerate(onto.parent):
        if parent >= 0:
            assert torch.all(out[..., child] <= out[..., parent])
    # equals the explicit min over the root path
    for i in range(onto.num_nodes):
        ref = scores[..., onto.ancestors(i) + [i]].amin(dim=-1)
        assert torch.equal(out[..., i], ref)
    assert torch.all(out <= scores)


def test_hierarchical_probabilities_matches_reference(onto: AnatomyOntology) -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(3, onto.num_nodes, generator=g)
    labels = torch.from_numpy(onto.label_batch(["thorax/heart", "fetus/fetal brain/transthalamic plane", "other"])[0])
    out = onto.hierarchical_probabilities(scores, labels)
    for b in range(3):
        for i in range(onto.num_nodes):
            if labels[b, i] > 0:
                ref = scores[b, onto.ancestors(i) + [i]].min()
            else:
                ref = scores[b, onto.descendants(i) + [i]].max()
            assert out[b, i] == ref


def test_unknown_path_error(onto: AnatomyOntology) -> None:
    with pytest.raises(UnknownAnatomyError) as err:
        onto.index("thorax/heart/apical four chamber")
    message = str(err.value)
    assert "thorax/heart/apical four chamber" in message
    assert "thorax/heart/apical four-chamber" in message  # suggestion
    assert isinstance(err.value, ValueError)
    with pytest.raises(UnknownAnatomyError, match="abdomen/livr"):
        onto.label_vector("abdomen/livr")
    with pytest.raises(UnknownAnatomyError) as err:
        onto.index("apical four chamber")  # missing region and organ: suggested by leaf name
    assert "thorax/heart/apical four-chamber" in str(err.value)


def test_truncate(onto: AnatomyOntology) -> None:
    path = "fetus/fetal heart/four-chamber view"
    assert onto.level_names == ("region", "organ", "structure")
    assert onto.truncate(path, 0) == "fetus"
    assert onto.truncate(path, "organ") == "fetus/fetal heart"
    assert onto.truncate(path, 2) == path
    assert onto.truncate("Fetus/Fetal Heart", 1) == "fetus/fetal heart"
    assert onto.truncate("fetus/fetal heart", "structure") is None
    assert onto.truncate(None, 0) is None
    with pytest.raises(UnknownAnatomyError):
        onto.truncate("fetus/fetal hart", 0)


# ----------------------------------------------------------------------------- tiny tree, by hand
def test_tiny_structure(tiny: AnatomyOntology) -> None:
    assert tiny.nodes == TINY
    assert tiny.parent == [-1, 0, 1, 1, 0, -1, 5]
    assert tiny.depth == [0, 1, 2, 2, 1, 0, 1]
    assert tiny.level_counts() == [2, 3, 2]
    assert tiny.descendants(0) == [1, 2, 3, 4]
    expected = torch.tensor(
        [  # j:  a  x  s  t  y  b  z
            [1, 0, 0, 0, 0, 0, 0],  # a
            [1, 1, 0, 0, 0, 0, 0],  # a/x
            [1, 1, 1, 0, 0, 0, 0],  # a/x/s
            [1, 1, 0, 1, 0, 0, 0],  # a/x/t
            [1, 0, 0, 0, 1, 0, 0],  # a/y
            [0, 0, 0, 0, 0, 1, 0],  # b
            [0, 0, 0, 0, 0, 1, 1],  # b/z
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tiny.ancestor_matrix(), expected)


def test_tiny_coherent_scores(tiny: AnatomyOntology) -> None:
    out = tiny.coherent_scores(torch.tensor(TINY_SCORES))
    # a=.9; x=min(.9,.6)=.6; s=min(.9,.6,.8)=.6; t=min(.9,.6,.2)=.2; y=min(.9,.3)=.3;
    # b=.4; z=min(.4,.7)=.4
    assert torch.allclose(out, torch.tensor([0.9, 0.6, 0.6, 0.2, 0.3, 0.4, 0.4]))


def test_tiny_label_vector(tiny: AnatomyOntology) -> None:
    labels, known = tiny.label_vector("a/x")
    assert labels.tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert known.tolist() == [True, True, False, False, True, True, True]
    labels, known = tiny.label_vector("a/x/s")
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert known.all()
    labels, known = tiny.label_vector("b")
    assert labels.tolist() == [0, 0, 0, 0, 0, 1, 0]
    assert known.tolist() == [True] * 6 + [False]


def test_tiny_hierarchical_probabilities_and_loss(tiny: AnatomyOntology) -> None:
    scores = torch.tensor([TINY_SCORES, TINY_SCORES], requires_grad=True)
    l0, k0 = tiny.label_vector("a/x")  # organ-level label
    l1, k1 = tiny.label_vector("a/x/s")  # structure-level label
    labels = torch.from_numpy(np.stack([l0, l1]))
    known = torch.from_numpy(np.stack([k0, k1]))

    probs = tiny.hierarchical_probabilities(scores, labels)
    # Image 0, label a/x: positives a, x take the min over their root path:
    #   a = .9, x = min(.9, .6) = .6;
    # negatives take the max over their subtree:
    #   s = .8, t = .2 (both unknown), y = .3, b = max(.4, .7) = .7, z = .7.
    # Image 1, label a/x/s: a = .9, x = .6, s = min(.9, .6, .8) = .6 (positive);
    #   t = .2, y = .3, b = .7, z = .7 (negative).
    expected = torch.tensor([[0.9, 0.6, 0.8, 0.2, 0.3, 0.7, 0.7], [0.9, 0.6, 0.6, 0.2, 0.3, 0.7, 0.7]])
    assert torch.allclose(probs, expected)

    # Image 0 alone: known entries a, x (positive), y, b, z (negative):
    #   (-ln .9 - ln .6 - ln(1-.3) - ln(1-.7) - ln(1-.7)) / 5
    #   = (0.1053605 + 0.5108256 + 0.3566749 + 1.2039728 + 1.2039728) / 5 = 3.3808066 / 5
    loss0 = tiny.hierarchy_loss(scores[:1], labels[:1], known[:1])
    assert loss0.item() == pytest.approx(0.6761613, abs=1e-6)
    assert loss0.item() == pytest.approx(
        -(math.log(0.9) + math.log(0.6) + math.log(0.7) + 2 * math.log(0.3)) / 5, abs=1e-6
    )
    # Image 1 alone, all 7 known:
    #   -ln .9 - 2 ln .6 - ln(1-.2) - ln(1-.3) - 2 ln(1-.7)
    #   = 0.1053605 + 1.0216512 + 0.2231436 + 0.3566749 + 2.4079456 = 4.1147758; / 7
    loss1 = tiny.hierarchy_loss(scores[1:], labels[1:], known[1:])
    assert loss1.item() == pytest.approx(4.1147758 / 7, abs=1e-6)
    # The batch averages over all 12 known entries, not per image.
    loss = tiny.hierarchy_loss(scores, labels, known)
    assert loss.item() == pytest.approx((3.3808066 + 4.1147758) / 12, abs=1e-6)

    # Gradients reach only the winners. Image 0 (loss0 scale 1/12 in the batch loss):
    #   a: d(-ln p)/dp = -1/.9; x: -1/.6; y: 1/(1-.3);
    #   b's max winner is z, so z gets 1/(1-.7) from b and 1/(1-.7) from itself, b gets 0;
    #   s and t are unknown, and s is not x's winner: 0.
    loss.backward()
    grad0 = scores.grad[0]
    expected0 = torch.tensor([-1 / 0.9, -1 / 0.6, 0.0, 0.0, 1 / 0.7, 0.0, 2 / 0.3]) / 12
    assert torch.allclose(grad0, expected0, atol=1e-6)
    # Image 1: s's path min is x (.6), so x gets -1/.6 twice and s nothing; t: 1/(1-.2).
    expected1 = torch.tensor([-1 / 0.9, -2 / 0.6, 0.0, 1 / 0.8, 1 / 0.7, 0.0, 2 / 0.3]) / 12
    assert torch.allclose(scores.grad[1], expected1, atol=1e-6)


def test_tiny_loss_clamp_and_empty(tiny: AnatomyOntology) -> None:
    # A positive scored exactly 0 is clamped to 1e-6: loss -ln(1e-6) = 13.8155, finite.
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    labels, known = (torch.from_numpy(a)[None] for a in tiny.label_vector("a"))
    loss = tiny.hierarchy_loss(scores, labels, known)
    # known: a, b, z (descendants of a unknown). a -> clamp(0) = 1e-6; b, z -> 0 -> ln(1-1e-6)~0
    assert loss.item() == pytest.approx(-math.log(1e-6) / 3, rel=1e-4)
    assert torch.isfinite(loss)

    scores = torch.rand(2, 7, requires_grad=True)
    none = torch.zeros(2, 7, dtype=torch.bool)
    loss = tiny.hierarchy_loss(scores, torch.zeros(2, 7), none)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(scores.grad, torch.zeros(2, 7))


def test_gradient_flows_through_network(onto: AnatomyOntology) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(8, onto.num_nodes)
    features = torch.randn(4, 8)
    labels, known = (torch.from_numpy(a) for a in onto.label_batch(["thorax/heart", "abdomen", None, "other"]))
    loss = onto.hierarchy_loss(torch.sigmoid(head(features)), labels, known)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    # One SGD step lowers the loss.
    with torch.no_grad():
        for p in head.parameters():
            p -= 0.5 * p.grad
    assert onto.hierarchy_loss(torch.sigmoid(head(features)), labels, known) < loss


def test_deepest_confident_path(tiny: AnatomyOntology, onto: AnatomyOntology) -> None:
    scores = torch.tensor(TINY_SCORES)
    # a (.9) beats b (.4); x (.6) beats y (.3); s's coherent score is min(.9,.6,.8) = .6
    assert tiny.deepest_confident_path(scores, 0.5) == "a/x/s"
    assert tiny.deepest_confident_path(scores, 0.65) == "a"  # x's .6 falls short
    assert tiny.deepest_confident_path(scores, 0.95) is None
    # A child's raw score cannot carry its parent: b/z's .99 is capped by b's .8
    assert tiny.deepest_confident_path([0.1, 0.0, 0.0, 0.0, 0.0, 0.8, 0.99]) == "b/z"
    assert tiny.deepest_confident_path(np.array([0.1, 0.0, 0.0, 0.0, 0.0, 0.8, 0.3])) == "b"

    s = torch.zeros(onto.num_nodes)
    for path in ["fetus", "fetus/fetal brain", "fetus/fetal brain/transcerebellar plane"]:
        s[onto.index(path)] = 0.9
    s[onto.index("fetus/fetal head")] = 0.7
    s[onto.index("thorax")] = 0.6
    assert onto.deepest_confident_path(s) == "fetus/fetal brain/transcerebellar plane"
    with pytest.raises(ValueError):
        onto.deepest_confident_path(torch.zeros(2, onto.num_nodes))


def test_invalid_yaml_rejected(tmp_path: Path) -> None:
    cases = {
        "gap.yaml": '- {index: 0, path: "a"}\n- {index: 2, path: "a/x"}\n',
        "orphan.yaml": '- {index: 0, path: "a/x"}\n- {index: 1, path: "a"}\n',
        "dup.yaml": '- {index: 0, path: "a"}\n- {index: 1, path: "a"}\n',
        "upper.yaml": '- {index: 0, path: "Abdomen"}\n',
        "notalist.yaml": "a: 1\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError):
            AnatomyOntology.from_yaml(tmp_path / name)
    with pytest.raises(ValueError, match="last dimension"):
        load_ontology().coherent_scores(torch.zeros(3))


def test_balanced_hierarchy_loss_averages_positives_and_negatives_separately():
    ontology = load_ontology()
    labels_np, known_np = ontology.label_vector("thorax/breast")
    labels, known = torch.as_tensor(labels_np)[None], torch.as_tensor(known_np)[None]
    scores = torch.full((1, ontology.num_nodes), 0.2)
    # Every positive (thorax, thorax/breast) has coherent probability 0.2, every negative 0.2.
    positives = int(labels.sum())
    negatives = int((known & (labels == 0)).sum())
    assert positives == 2 and negatives > 50
    plain = ontology.hierarchy_loss(scores, labels, known)
    balanced = ontology.hierarchy_loss(scores, labels, known, balanced=True)
    bce_pos, bce_neg = -math.log(0.2), -math.log(0.8)
    assert plain.item() == pytest.approx((positives * bce_pos + negatives * bce_neg) / (positives + negatives), rel=1e-5)
    assert balanced.item() == pytest.approx(0.5 * (bce_pos + bce_neg), rel=1e-5)
    # Only negatives known (an image labelled "other" has a positive; make none positive):
    only_negative = ontology.hierarchy_loss(scores, torch.zeros_like(labels), known, balanced=True)
    assert only_negative.item() == pytest.approx(bce_neg, rel=1e-5)
