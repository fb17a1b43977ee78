"""The official Python `kubernetes` client against a skiff server: create, list, patch, watch.

Run by tests/python_client.rs with KUBECONFIG set; exits non-zero on the first failed check.
"""
import sys
import threading

from kubernetes import client, config, watch

config.load_kube_config()
core = client.CoreV1Api()
apps = client.AppsV1Api()

ns = "pyclient"
core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))

# create: the client sends no Content-Type-specific kind/apiVersion for dict bodies.
core.create_namespaced_config_map(ns, {"metadata": {"name": "one"}, "data": {"a": "1"}})
dep = client.V1Deployment(
    metadata=client.V1ObjectMeta(name="web", labels={"app": "web"}),
    spec=client.V1DeploymentSpec(
        replicas=2,
        selector=client.V1LabelSelector(match_labels={"app": "web"}),
        template=client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels={"app": "web"}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="skiff/echo:1.0")]),
        ),
    ),
)
created = apps.create_namespaced_deployment(ns, dep)
assert created.spec.strategy.type == "RollingUpdate", created.spec.strategy

# list with a label selector
got = apps.list_namespaced_deployment(ns, label_selector="app=web")
assert [d.metadata.name for d in got.items] == ["web"], got.items
assert got.metadata.resource_version, "lists carry a resourceVersion"
none = apps.list_namespaced_deployment(ns, label_selector="app=other")
assert none.items == [], none.items

# patch (the client sends a dict as strategic merge patch for deployments)
apps.patch_namespaced_deployment("web", ns, {"spec": {"replicas": 4}})
assert apps.read_namespaced_deployment("web", ns).spec.replicas == 4
core.patch_namespaced_config_map("one", ns, {"data": {"b": "2"}})
assert core.read_namespaced_config_map("one", ns).data == {"a": "1", "b": "2"}

# a stale update gets 409
cm = core.read_namespaced_config_map("one", ns)
core.replace_namespaced_config_map("one", ns, cm)
try:
    core.replace_namespaced_config_map("one", ns, cm)  # same (now stale) resourceVersion
    sys.exit("a stale resourceVersion was accepted")
except client.ApiException as e:
    assert e.status == 409, e

# watch: a change made after the watch starts arrives
rv = core.list_namespaced_config_map(ns).metadata.resource_version
seen = []

def watcher():
    w = watch.Watch()
    for ev in w.stream(core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=20):
        seen.append((ev["type"], ev["object"].metadata.name))
        if ev["object"].metadata.name == "two":
            w.stop()

t = threading.Thread(target=watcher)
t.start()
import time
time.sleep(1)
core.create_namespaced_config_map(ns, {"metadata": {"name": "two"}, "data": {}})
t.join(30)
assert ("ADDED", "two") in seen, seen

# errors come back as Status with the right code
try:
    core.read_namespaced_config_map("nope", ns)
    sys.exit("reading a missing object succeeded")
except client.ApiException as e:
    assert e.status == 404, e

core.delete_namespace(ns)
print("python client: all checks passed")
