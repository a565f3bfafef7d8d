"""docker/ checked statically (no Docker engine in CI): versions agree with pyproject, files referenced exist,
and the GPU discovery script prints Spark's JSON from (a fake) nvidia-smi."""
import json
import os
import re
import subprocess
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(REPO, "docker")


def read(name):
    with open(os.path.join(DOCKER, name)) as f:
        return f.read()


def pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def bounds(spec: str):
    """'pyspark>=3.5,<5' -> ((3, 5), (5, 0)): the lower and upper (exclusive) bounds as (major, minor)."""
    lo = re.search(r">=(\d+)\.(\d+)", spec).groups()
    hi = re.search(r"<(\d+)(?:\.(\d+))?", spec).groups()
    return tuple(map(int, lo)), (int(hi[0]), int(hi[1] or 0))


def test_ci_spark_lines_lie_inside_pyproject():
    """./dev test's two environments (.ci/spark-*.txt constraints) are both installable with pyproject's pin."""
    lo, hi = bounds(next(d for d in pyproject()["dependencies"] if d.startswith("pyspark")))
    lines = {}
    for name in ("spark-3.5.txt", "spark-4.txt"):
        with open(os.path.join(REPO, ".ci", name)) as f:
            lines[name] = bounds(next(ln for ln in f if ln.startswith("pyspark")))
        assert lo <= lines[name][0] and lines[name][1] <= hi, (name, lines[name], (lo, hi))
    assert lines["spark-3.5.txt"][1] <= lines["spark-4.txt"][0], "the two lines must not overlap"
    assert bounds("pyspark>=3.5,<5") == ((3, 5), (5, 0)) and bounds("pyspark>=3.5,<3.6") == ((3, 5), (3, 6))


def test_dockerfile_spark_version_satisfies_pyproject():
    spark = re.search(r"ARG SPARK_VERSION=(\d+)\.(\d+)\.(\d+)", read("Dockerfile"))
    assert spark, "Dockerfile must pin ARG SPARK_VERSION"
    spec = next(d for d in pyproject()["dependencies"] if d.startswith("pyspark"))
    lo, hi = bounds(spec)
    version = tuple(int(v) for v in spark.groups()[:2])
    assert lo <= version < hi, f"Spark {spark.group(0)} vs pyproject {spec}"
    assert '"pyspark==${SPARK_VERSION}"' in read("Dockerfile")
    assert '"pyspark[connect]==${SPARK_VERSION}"' in read("Dockerfile")     # Connect clients in the image


def test_dockerfile_cuda_major_matches_the_gpu_extra():
    cuda = re.search(r"nvidia/cuda:(\d+)\.\d+\.\d+-runtime", read("Dockerfile"))
    assert cuda, "the base image must be a CUDA runtime image"
    extra = " ".join(pyproject()["optional-dependencies"]["gpu"])
    assert f"cupy-cuda{cuda.group(1)}x" in extra
    assert "openjdk-17" in read("Dockerfile") and "python3.11" in read("Dockerfile")
    assert re.search(r'pip install "/opt/ffps\[gpu\]"', read("Dockerfile"))


def test_files_the_dockerfile_copies_exist():
    for src in re.findall(r"^COPY (.+) \S+$", read("Dockerfile"), flags=re.M):
        for part in src.split():
            assert os.path.exists(os.path.join(REPO, part)), f"Dockerfile copies missing {part}"


def test_compose_workers_reserve_gpus_and_use_the_discovery_script():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load(read("docker-compose.yml"))
    services = compose["services"]
    workers = [s for name, s in services.items() if name.startswith("spark-worker")]
    assert "spark-master" in services and len(workers) >= 2
    for w in workers:
        devices = w["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert "/opt/ffps/docker/getGpusResources.sh" in w["environment"]["SPARK_WORKER_OPTS"]
        assert "ffps-data:/data" in w["volumes"]
    assert os.path.exists(os.path.join(REPO, services["spark-master"]["build"]["context"].replace("..", "."),
                                       services["spark-master"]["build"]["dockerfile"]))
    connect = services["spark-connect"]
    assert connect["image"] == services["spark-master"]["image"] and "15002:15002" in connect["ports"]
    assert connect["command"][0] == "/opt/spark/sbin/start-connect-server.sh" and \
        "spark://spark-master:7077" in connect["command"]


def test_compose_mentions_only_existing_files_without_yaml():
    text = read("docker-compose.yml")
    assert "getGpusResources.sh" in text and "dockerfile: docker/Dockerfile" in text
    assert os.access(os.path.join(DOCKER, "getGpusResources.sh"), os.X_OK)


@pytest.mark.parametrize("indices,expected", [("0\n1\n", ["0", "1"]), ("3\n", ["3"]), ("", [])])
def test_discovery_script_prints_spark_json(tmp_path, indices, expected):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/usr/bin/env bash\nprintf '" + indices.replace("\n", "\\n") + "'\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run([os.path.join(DOCKER, "getGpusResources.sh")], env=env, capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert json.loads(out) == {"name": "gpu", "addresses": expected}
