import pytest

from raydefense.errors import StorageError
from raydefense.storage import Storage, boto3_client


def _exercise(st: Storage):
    st.check_writable()
    st.write_json("a/b.json", {"x": 1, "t": (1, 2)})
    assert st.read_json("a/b.json") == {"x": 1, "t": [1, 2]}
    assert st.exists("a/b.json") and not st.exists("a/none.json")
    assert st.listdir("a") == ["b.json"]
    import torch

    st.save_torch("m/w.pt", {"w": torch.arange(3.0)})
    assert torch.equal(st.load_torch("m/w.pt")["w"], torch.arange(3.0))
    st.delete_dir("a")
    assert not st.exists("a/b.json")
    with pytest.raises(StorageError, match="not found"):
        st.read_bytes("a/b.json")


def test_local_storage(tmp_path):
    st = Storage.open(str(tmp_path / "root"))
    _exercise(st)
    # Atomic writes leave no temporary files behind.
    st.write_text("x.txt", "hello")
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["m", "x.txt"]


def test_s3_storage_against_moto_server(s3_server, s3_bucket):
    st = Storage.open(f"s3://{s3_bucket}/prefix", endpoint_url=s3_server)
    _exercise(st)
    st.write_text("hello.txt", "hi")
    keys = [o["Key"] for o in boto3_client(endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert "prefix/hello.txt" in keys


def test_storage_survives_pickling(s3_server, s3_bucket):
    import pickle

    st = Storage.open(f"s3://{s3_bucket}/p", endpoint_url=s3_server).child("run")
    st.write_text("f.txt", "x")
    again = pickle.loads(pickle.dumps(st))
    assert again.read_text("f.txt") == "x"


def test_unreachable_endpoint_is_one_line_error():
    st = Storage.open("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(StorageError) as info:
        st.check_writable()
    assert "s3://bucket/prefix" in str(info.value) and "\n" not in str(info.value)


def test_missing_bucket_is_an_error(s3_server):
    st = Storage.open("s3://no-such-bucket-xyz/p", endpoint_url=s3_server)
    with pytest.raises(StorageError, match="no-such-bucket-xyz"):
        st.check_writable()


def test_unsupported_scheme():
    with pytest.raises(StorageError, match="gs://"):
        Storage.open("gs://bucket/x")


def test_pickled_storage_keeps_an_endpoint_from_the_environment(monkeypatch):
    """A Storage sent to a Ray worker on another node (issue 9): the endpoint and region that came
    from AWS_ENDPOINT_URL on the driver travel inside the pickle, not through the environment."""
    import pickle

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    st = Storage.open("s3://bucket/run")
    blob = pickle.dumps(st)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    again = pickle.loads(blob)
    assert again.endpoint_url == "http://127.0.0.1:9000"
    settings = _s3_settings(again.fs)
    assert (settings["endpoint_override"], settings["scheme"], settings["region"]) == ("127.0.0.1:9000", "http", "us-east-1")
    # And the filesystem really talks http to that endpoint: nothing listens there, so the error
    # names the endpoint's failure, not AWS.
    with pytest.raises(StorageError, match="s3://bucket/run"):
        again.check_writable()
    # A child (one run under the root) carries them too.
    child = pickle.loads(pickle.dumps(Storage.open("s3://b/p", endpoint_url="https://minio.local:9443",
                                                   region="eu-west-1").child("r")))
    settings = _s3_settings(child.fs)
    assert (settings["endpoint_override"], settings["scheme"], settings["region"]) == ("minio.local:9443", "https", "eu-west-1")


def _s3_settings(fs) -> dict:
    """What a pyarrow S3FileSystem was built with (its own pickling state)."""
    return fs.__reduce__()[1][0]


@pytest.mark.parametrize("content, why", [
    (b"", "empty file"),
    (b'{"stage": "prep', "not JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"[1, 2]", "holds a list"),
])
def test_corrupt_json_names_the_file_and_what_to_do(tmp_path, content, why):
    from raydefense.errors import CorruptFileError

    st = Storage.open(str(tmp_path))
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "x.json").write_bytes(content)
    with pytest.raises(CorruptFileError) as info:
        st.read_json("stages/x.json", expect=dict)
    msg = str(info.value)
    assert str(tmp_path / "stages" / "x.json") in msg and why in msg and "delete it" in msg and "\n" not in msg
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("content, why", [
    (b"name: [unclosed\n", "not valid YAML at line"),
    (b"just a string", "holds a str"),
    (b"", "empty file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8"),
])
def test_corrupt_yaml_names_the_file(tmp_path, content, why):
    from raydefense.errors import CorruptFileError

    (tmp_path / "config.yaml").write_bytes(content)
    with pytest.raises(CorruptFileError, match=why) as info:
        Storage.open(str(tmp_path)).read_yaml("config.yaml", hint="use another --name")
    assert "config.yaml" in str(info.value) and "use another --name" in str(info.value)


@pytest.mark.parametrize("content, why", [(b"", "empty file"), (b"PK\x03\x04 truncated zip", "not a torch file")])
def test_corrupt_weights_name_the_file(tmp_path, content, why):
    from raydefense.errors import CorruptFileError

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "target.pt").write_bytes(content)
    with pytest.raises(CorruptFileError, match=why) as info:
        Storage.open(str(tmp_path)).load_torch("models/target.pt")
    assert "target.pt" in str(info.value) and "\n" not in str(info.value)
