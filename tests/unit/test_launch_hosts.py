"""Host lists for `medsapiens launch`: SLURM's compressed node lists (expected lists worked out by hand
from SLURM's hostlist rules) and hostfile validation with errors naming the line."""
from __future__ import annotations

import pytest

from medsapiens.launch.hosts import HostError, expand_nodelist, hostfile_text, read_hostfile

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("nodelist, expected", [
    ("login5", ["login5"]),
    ("gpu-[01-03,07],login5", ["gpu-01", "gpu-02", "gpu-03", "gpu-07", "login5"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),  # no padding: the range starts at "8"
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),  # padding from "098"
    ("x[3]", ["x3"]),
    ("c1,c[2-3],d[05,07-08]", ["c1", "c2", "c3", "d05", "d07", "d08"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("a-[1,3]-b,z", ["a-1-b", "a-3-b", "z"]),
])
def test_nodelist_expands_in_slurm_order(nodelist, expected):
    assert expand_nodelist(nodelist) == expected


@pytest.mark.parametrize("nodelist, message", [
    ("gpu-[01-03", "never closed"),
    ("gpu-01]", "unbalanced"),
    ("g[1-[2]]", "nested"),
    ("gpu-[03-01]", "bad range '03-01'"),
    ("gpu-[a-b]", "bad range 'a-b'"),
    ("gpu-[]", "bad range ''"),
    ("gpu-[1-2-3]", "bad range '1-2-3'"),
    ("a,,b", "empty entry"),
    ("", "empty entry"),
    ("n1,n[1-2]", "names n1 more than once"),
])
def test_bad_nodelists_are_refused_with_the_reason(nodelist, message):
    with pytest.raises(HostError, match=message.replace("[", r"\[")):
        expand_nodelist(nodelist)


def test_hostfile_skips_comments_and_keeps_order(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# our nodes\nnode-b slots=4\n\n   # spare\nnode-a  slots=2   # the small one\n")
    assert list(read_hostfile(path).items()) == [("node-b", 4), ("node-a", 2)]
    assert hostfile_text(read_hostfile(path)) == "node-b slots=4\nnode-a slots=2\n"


@pytest.mark.parametrize("text, message", [
    ("node-a slots=4\nnode-b 4\n", ":2: expected 'HOST slots=N', got 'node-b 4'"),
    ("node-a slots=4\nnode-b slots=four\n", ":2: expected 'HOST slots=N'"),
    ("# a\nnode-a slots=0\n", ":2: node-a has slots=0"),
    ("node-a slots=4\n\nnode-a slots=2\n", ":3: node-a is listed again (first on line 1)"),
    ("# nothing here\n\n", "no hosts"),
])
def test_bad_hostfiles_name_the_line(tmp_path, text, message):
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(HostError) as error:
        read_hostfile(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_missing_hostfile_is_named(tmp_path):
    with pytest.raises(HostError, match="hostfile not found: .*nowhere"):
        read_hostfile(tmp_path / "nowhere")
