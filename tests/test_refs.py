"""The one set of local / Hub / sha predicates: stored refs by syntax alone, user arguments by what exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from xlora_hub.refs import has_path_syntax, hub_url, is_commit_sha, is_hub_repo_id, is_local_argument, is_stored_hub_id


@pytest.mark.parametrize("value", ["a" * 40, "0123456789abcdef0123456789abcdef01234567"])
def test_commit_sha_is_forty_lowercase_hex(value):
    assert is_commit_sha(value)


@pytest.mark.parametrize("value", ["A" * 40, "a" * 39, "a" * 41, "main", "v1.0", "", None, 40])
def test_anything_else_is_not_a_commit_sha(value):
    assert not is_commit_sha(value)


@pytest.mark.parametrize("value", ["gpt2", "my-org/lora-math", "Foo-BAR_foo.bar123", "123"])
def test_hub_repo_ids_follow_huggingface_hub(value):
    assert is_hub_repo_id(value)


@pytest.mark.parametrize("value", ["a/b/c", "foo--bar", "other..repo", ".repo", "foo.git", "", None, "x" * 97])
def test_invalid_repo_ids_are_refused_like_huggingface_hub(value):
    assert not is_hub_repo_id(value)


@pytest.mark.parametrize("value", ["./mix", "../mix", "/abs/mix", "~/mix", ".", "..", ".\\mix"])
def test_path_syntax(value):
    assert has_path_syntax(value)
    assert not is_stored_hub_id(value)
    assert is_local_argument(value)


def test_a_stored_hub_id_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_stored_hub_id("my-org/base")
    (tmp_path / "my-org" / "base").mkdir(parents=True)
    assert is_stored_hub_id("my-org/base")  # a folder of that name in the cwd changes nothing
    assert is_local_argument("my-org/base")  # but a user argument naming an existing folder is local
    assert is_local_argument(Path("my-org/base"))
    assert not is_local_argument("my-org/other")


@pytest.mark.parametrize("value", ["!" * 5000, "bad\0name"])
def test_a_name_the_os_cannot_stat_is_not_local(value):
    assert not is_local_argument(value)  # not an OSError / ValueError from stat()


def test_hub_urls_on_the_configured_endpoint():
    assert hub_url("o/r", endpoint="https://hf.example/") == "https://hf.example/o/r"
    assert hub_url("o/r", revision="a" * 40, endpoint="https://h") == f"https://h/o/r/tree/{'a' * 40}"
    assert hub_url("o/r", subfolder="/x/y/", endpoint="https://h") == "https://h/o/r/tree/main/x/y"
    assert hub_url("o/s", repo_type="space", endpoint="https://h") == "https://h/spaces/o/s"
