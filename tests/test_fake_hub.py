"""The real huggingface_hub client and transformers, unchanged, against the local FakeHub."""

from __future__ import annotations

import pytest

from tweetbot_dev.tiny_model import build_tiny_gpt2

CORPUS = ["My dream is to fly over the sea.", "My dream is a quiet house by the lake.",
          "Every night I dream of mountains and rivers."] * 5


def test_publish_download_and_generate(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from transformers import pipeline

    model_dir = build_tiny_gpt2(tmp_path / "model", CORPUS)
    api = HfApi(endpoint=hub.url, token="hf_good")
    assert api.whoami()["name"] == "alice"
    assert [org["name"] for org in api.whoami()["orgs"]] == ["tweetbots"]

    for _ in range(2):  # the second create answers 409, which exist_ok turns into success
        repo_url = api.create_repo("tweetbots/dreamer", private=False, exist_ok=True)
        assert repo_url.repo_id == "tweetbots/dreamer"

    commit = api.upload_folder(repo_id="tweetbots/dreamer", folder_path=model_dir, commit_message="Publish dreamer")
    repo = hub.repos["tweetbots/dreamer"]
    assert [c.message for c in repo.commits] == ["initial commit", "Publish dreamer"]
    assert commit.oid == repo.head.id and len(commit.oid) == 40
    assert commit.commit_url == f"{hub.url}/tweetbots/dreamer/commit/{commit.oid}"
    assert sorted(repo.head.files) == sorted(p.name for p in model_dir.iterdir())

    # Anonymous: the repo is public.
    downloaded = hf_hub_download("tweetbots/dreamer", "config.json", endpoint=hub.url, token=False)
    assert open(downloaded, "rb").read() == (model_dir / "config.json").read_bytes()
    pinned = hf_hub_download("tweetbots/dreamer", "config.json", revision=commit.oid, endpoint=hub.url, token=False)
    assert open(pinned, "rb").read() == (model_dir / "config.json").read_bytes()
    # The same commit by its id: huggingface_hub asks (HEAD) and finds the file in its cache; one download.
    assert hub.downloads == ["tweetbots/dreamer@main/config.json"]

    generator = pipeline("text-generation", model="tweetbots/dreamer")
    text = generator("My dream is", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("My dream is") and len(text) > len("My dream is")

    # Uploading the same folder again changes nothing: the client skips the commit, then asks for the head.
    again = api.upload_folder(repo_id="tweetbots/dreamer", folder_path=model_dir, commit_message="Publish again")
    assert again.oid == commit.oid and len(repo.commits) == 2


def test_auth_errors(hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    HfApi(endpoint=hub.url, token="hf_good").create_repo("tweetbots/dreamer")
    for exist_ok in (False, True):  # with exist_ok the client retries a 401/403 as a read of the repo
        with pytest.raises(HfHubHTTPError) as error:
            HfApi(endpoint=hub.url, token="hf_wrong").create_repo("tweetbots/dreamer", exist_ok=exist_ok)
        assert error.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as error:
            HfApi(endpoint=hub.url, token="hf_good").create_repo("someoneelse/x", exist_ok=exist_ok)
        assert error.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as error:  # with exist_ok, an anonymous read of the public repo would pass
        HfApi(endpoint=hub.url, token=False).create_repo("tweetbots/dreamer")
    assert error.value.response.status_code == 401
    assert sorted(hub.repos) == ["tweetbots/dreamer"]


def test_private_repo_needs_the_owners_token(hub):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi(endpoint=hub.url, token="hf_good")
    api.create_repo("tweetbots/secret", private=True)
    assert hub.repos["tweetbots/secret"].private
    api.upload_file(path_or_fileobj=b"hidden", path_in_repo="notes.txt", repo_id="tweetbots/secret",
                    commit_message="Add notes")

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tweetbots/secret", "notes.txt", endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info("tweetbots/secret")
    path = hf_hub_download("tweetbots/secret", "notes.txt", endpoint=hub.url, token="hf_good")
    assert open(path, "rb").read() == b"hidden"


def test_branches_hold_their_own_commits(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=hub.url, token="hf_good")
    api.create_repo("tweetbots/dreamer")
    api.upload_file(path_or_fileobj=b"final", path_in_repo="model.txt", repo_id="tweetbots/dreamer", commit_message="Publish")
    for _ in range(2):  # the second answers 409, which exist_ok turns into success
        api.create_branch("tweetbots/dreamer", branch="checkpoints", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as error:
        api.create_branch("tweetbots/dreamer", branch="checkpoints")
    assert error.value.response.status_code == 409
    assert [ref.name for ref in api.list_repo_refs("tweetbots/dreamer").branches] == ["checkpoints", "main"]

    # Each push replaces the branch's files (delete_patterns="*" sends deletedFile operations); main stays.
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        (folder / "sub").mkdir(parents=True)
        (folder / f"state-{step}.json").write_text(str(step))
        (folder / "sub" / "shared.bin").write_bytes(b"x" * step)
        commit = api.upload_folder(repo_id="tweetbots/dreamer", folder_path=folder, revision="checkpoints",
                                   commit_message=f"step {step}", delete_patterns="*")
    repo = hub.repos["tweetbots/dreamer"]
    assert repo.branch("checkpoints").id == commit.oid != repo.head.id
    assert sorted(repo.branch("checkpoints").files) == ["state-4.json", "sub/shared.bin"]
    assert sorted(repo.head.files) == ["model.txt"] and repo.head.message == "Publish"
    assert [c.message for c in repo.history("checkpoints")] == ["initial commit", "Publish", "step 2", "step 4"]
    anonymous = HfApi(endpoint=hub.url, token=False)
    assert sorted(anonymous.list_repo_files("tweetbots/dreamer", revision="checkpoints")) == ["state-4.json", "sub/shared.bin"]
    path = hf_hub_download("tweetbots/dreamer", "sub/shared.bin", revision="checkpoints", endpoint=hub.url, token=False)
    assert open(path, "rb").read() == b"xxxx"

    with pytest.raises(HfHubHTTPError) as error:  # a commit to a branch that does not exist
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="tweetbots/dreamer", revision="nope")
    assert error.value.response.status_code == 404
    with pytest.raises(HfHubHTTPError) as error:  # only writers create branches
        anonymous.create_branch("tweetbots/dreamer", branch="mine")
    assert error.value.response.status_code == 401
