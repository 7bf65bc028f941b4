"""actions/checkout, built in: what a job's /workspace holds."""

import subprocess
from pathlib import Path

from pinnace.ci.checkout import prepare


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.invalid")
    git(repo, "config", "user.name", "t")
    (repo / ".gitattributes").write_text("tests/** export-ignore\n*.txt text eol=crlf\n")
    (repo / ".gitignore").write_text("build/\n")
    (repo / "tests").mkdir()
    (repo / "tests" / "t.py").write_text("assert True\n")
    (repo / "a.txt").write_text("one\ntwo\n")
    (repo / "gone.c").write_text("int x;\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    (repo / "a.txt").write_text("one\nchanged\n")  # modified, not committed
    (repo / "gone.c").unlink()  # deleted, not committed
    (repo / "new.py").write_text("print(1)\n")  # untracked
    (repo / "build").mkdir()
    (repo / "build" / "out.o").write_text("ignored")
    return repo


def test_a_checkout_is_a_shallow_clone_with_the_working_trees_changes(tmp_path):
    repo = make_repo(tmp_path)
    with prepare(repo) as tree:
        assert (tree / "tests" / "t.py").exists()  # export-ignore: still checked out
        assert (tree / "a.txt").read_bytes() == b"one\r\nchanged\r\n"  # eol=crlf, changed
        assert not (tree / "gone.c").exists()
        assert (tree / "new.py").read_text() == "print(1)\n"
        assert not (tree / "build").exists()
        assert git(tree, "rev-parse", "--is-shallow-repository").strip() == "true"
        assert git(tree, "log", "--format=%s").strip() == "first"
        assert git(tree, "rev-parse", "HEAD") == git(repo, "rev-parse", "HEAD")
    assert not tree.exists()


def test_a_folder_that_is_no_repository_is_copied(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x").write_text("x")
    with prepare(tmp_path / "src") as tree:
        assert (tree / "x").read_text() == "x"


def github_hash(*contents: bytes) -> str:
    """hashFiles as GitHub's runner computes it: SHA-256 over each file's SHA-256."""
    import hashlib

    total = hashlib.sha256()
    for c in contents:
        total.update(hashlib.sha256(c).digest())
    return total.hexdigest()


def test_hash_files_hashes_what_a_checkout_holds_as_github_does(tmp_path):
    from pinnace.ci.checkout import checked_out_files, hash_files

    repo = make_repo(tmp_path)
    (repo / "sub").mkdir()
    (repo / "sub" / "req.txt").write_text("pkg\n")
    files = checked_out_files(repo)
    assert "build/out.o" not in files and "gone.c" not in files  # ignored, deleted
    assert {"new.py", "a.txt", "sub/req.txt", "tests/t.py"} <= set(files)
    ws = "/workspace"
    assert hash_files(repo, ["**/req.txt"], ws) == github_hash(b"pkg\n")
    assert hash_files(repo, ["/workspace/sub/req.txt"], ws) == github_hash(b"pkg\n")
    assert hash_files(repo, ["./sub/*.txt"], ws) == github_hash(b"pkg\n")
    assert hash_files(repo, ["*.txt"], ws) == github_hash(b"one\nchanged\n")
    both = github_hash(b"one\nchanged\n", b"pkg\n")  # (in path order)
    assert hash_files(repo, ["**/*.txt"], ws) == both
    assert hash_files(repo, ["**/*.txt\n!sub/**"], ws) == github_hash(b"one\nchanged\n")
    assert hash_files(repo, ["sub"], ws) == github_hash(b"pkg\n")  # a folder: its files
    assert hash_files(repo, ["sub/"], ws) == github_hash(b"pkg\n")
    assert hash_files(repo, ["s**.txt"], ws) == ""  # ** inside a name stays in the folder
    assert hash_files(repo, ["sub/**"], ws) == github_hash(b"pkg\n")
    assert hash_files(repo, ["nothing*"], ws) == ""
    assert hash_files(repo, ["build/*"], ws) == ""  # ignored by git: not checked out


def test_hash_files_of_a_folder_that_is_not_a_repository(tmp_path):
    from pinnace.ci.checkout import hash_files

    (tmp_path / "d" / ".git").mkdir(parents=True)
    (tmp_path / "d" / ".git" / "x").write_text("no")
    (tmp_path / "d" / "f").write_text("yes")
    assert hash_files(tmp_path / "d", ["**"], "/workspace") == github_hash(b"yes")
