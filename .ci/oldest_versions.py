"""Print pip requirements that pin the model libraries to the oldest releases pyproject.toml allows.

``diffusers>=0.30`` becomes ``diffusers==0.30.*``: the newest patch release of the floor's minor version.
"""
import tomllib

LIBRARIES = ("transformers", "diffusers", "open_clip_torch")

with open("pyproject.toml", "rb") as handle:
    dependencies = tomllib.load(handle)["project"]["dependencies"]
floors = dict(entry.split(">=") for entry in dependencies if entry.split(">=")[0] in LIBRARIES)
print(" ".join(f"{name}=={floors[name]}.*" for name in LIBRARIES))
