"""Class sets as data: names, the prompt strings CLIP sees, background prompts and templates.

Built-in sets live next to this file as YAML (``voc``, ``coco``). A user set is a YAML file of the
same schema or a plain-text file with one class per line (``name`` or ``name: synonym, synonym``).
"""

from __future__ import annotations

import difflib
import math
import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..errors import ClipesError

__all__ = ["ClassSet", "ClassSetError", "builtin_class_sets", "class_set_from_dict", "load_class_set"]

DEFAULT_TEMPLATE = "a clean origami {}."
# COCO's background prompts: the VOC list without the two that are objects elsewhere (keyboard, sign).
DEFAULT_BACKGROUND = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street",
    "valley", "bridge",
)


class ClassSetError(ClipesError):
    """A class set file is malformed, or a class name does not belong to the set."""


def _template_ok(template: str) -> bool:
    """Exactly one positional ``{}`` field (``{{`` and ``}}`` are literal braces): ``str.format(name)`` fills it."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return False
    return fields == [""]


def _key(name: str) -> str:
    """Lookup key for a class name: case, underscores and spacing do not matter."""
    return " ".join(name.replace("_", " ").lower().split())


@dataclass(frozen=True)
class ClassSet:
    """An ordered set of foreground classes; class ``c`` is written as value ``c + 1`` in masks."""

    name: str
    classes: tuple[str, ...]
    prompts: tuple[str, ...]
    background: tuple[str, ...]
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    box_threshold: float = 0.4
    aliases: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.classes:
            raise ClassSetError(f"class set {self.name!r} has no classes")
        if len(self.prompts) != len(self.classes):
            raise ClassSetError(f"class set {self.name!r}: one prompt per class is needed")
        bad = [t for t in self.templates if not _template_ok(t)]
        if not self.templates or bad:
            raise ClassSetError(f"class set {self.name!r}: templates: each needs exactly one '{{}}' placeholder "
                                f"for the class and no other braces" + (f", not {bad[0]!r}" if bad else ""))
        if not self.background:
            raise ClassSetError(f"class set {self.name!r}: background: at least one background prompt is needed")
        if isinstance(self.box_threshold, bool) or not (math.isfinite(self.box_threshold)
                                                        and 0 <= self.box_threshold <= 1):
            raise ClassSetError(f"class set {self.name!r}: box_threshold must be a number in [0, 1], "
                                f"not {self.box_threshold!r}")
        if len(self.classes) > 254:
            raise ClassSetError(f"class set {self.name!r} has {len(self.classes)} classes; "
                                "palette PNG masks hold at most 254 (255 is 'ignore')")
        seen: dict[str, str] = {}
        for n in self.classes:
            k = _key(n)
            if k in seen:
                raise ClassSetError(f"class set {self.name!r} lists {n!r} twice"
                                    + ("" if seen[k] == n else f" (as {seen[k]!r})"))
            seen[k] = n
        if len({_key(b) for b in self.background}) != len(self.background):
            raise ClassSetError(f"class set {self.name!r} has duplicate background prompts")
        lookup = {_key(n): i for i, n in enumerate(self.classes)}
        for alias, i in dict(self.aliases).items():
            lookup.setdefault(_key(alias), i)
        object.__setattr__(self, "aliases", lookup)

    def __len__(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int:
        """Index of a class given its name or an alias; a clear error with suggestions otherwise."""
        i = self.aliases.get(_key(name))
        if i is None:
            close = difflib.get_close_matches(_key(name), list(self.aliases), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ClassSetError(f"unknown class {name!r} for class set {self.name!r}{hint}")
        return i

    def to_dict(self) -> dict:
        return {"name": self.name, "classes": list(self.classes), "prompts": list(self.prompts),
                "background": list(self.background), "templates": list(self.templates),
                "box_threshold": self.box_threshold}


_KEYS = ("name", "classes", "background", "templates", "box_threshold")
_CLASS_KEYS = ("name", "prompt", "synonyms", "aliases")


def _strings(value, field: str, where: str) -> list[str]:
    """A YAML list of non-empty strings; a clear error for anything else (quote a number to use it)."""
    if not isinstance(value, list):
        raise ClassSetError(f"{where}: field '{field}' must be a list of strings, not {value!r}")
    bad = [v for v in value if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ClassSetError(f"{where}: field '{field}' must be a list of non-empty strings; {bad[0]!r} is not one")
    return list(value)


def _unknown_keys(data: dict, known: tuple[str, ...], where: str) -> None:
    unknown = [k for k in data if k not in known]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; known fields: {', '.join(known)}"
        raise ClassSetError(f"{where}: unknown field {unknown[0]!r}{hint}")


def _from_mapping(data: dict, name: str) -> ClassSet:
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise ClassSetError(f"{name}: expected a mapping with a 'classes' list")
    _unknown_keys(data, _KEYS, name)
    classes, prompts, aliases = [], [], {}
    for i, entry in enumerate(data["classes"]):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise ClassSetError(f"{name}: class #{i + 1} needs a 'name'")
        where = f"{name}: class {entry['name']!r}"
        _unknown_keys(entry, _CLASS_KEYS, where)
        synonyms = _strings(entry.get("synonyms", []), "synonyms", where)
        prompt = entry.get("prompt")
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise ClassSetError(f"{where}: field 'prompt' must be a non-empty string, not {prompt!r}")
        classes.append(entry["name"])
        prompts.append(prompt or ",".join([entry["name"], *synonyms]))
        for alias in [*_strings(entry.get("aliases", []), "aliases", where), *synonyms]:
            aliases[alias] = i
    set_name = data.get("name", name)
    if not isinstance(set_name, str):
        raise ClassSetError(f"{name}: field 'name' must be a string, not {set_name!r}")
    templates = data.get("templates", [DEFAULT_TEMPLATE])
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise ClassSetError(f"{name}: field 'templates' must be a list of strings, each with one '{{}}', "
                            f"not {templates!r}")
    box_threshold = data.get("box_threshold", 0.4)
    if isinstance(box_threshold, bool) or not isinstance(box_threshold, int | float):
        raise ClassSetError(f"{name}: field 'box_threshold' must be a number in [0, 1], not {box_threshold!r}")
    return ClassSet(
        name=set_name,
        classes=tuple(classes),
        prompts=tuple(prompts),
        background=tuple(_strings(data.get("background", list(DEFAULT_BACKGROUND)), "background", name)),
        templates=tuple(templates),
        box_threshold=float(box_threshold),
        aliases=aliases,
    )


def class_set_from_dict(data: dict) -> ClassSet:
    """The class set a run recorded (``ClassSet.to_dict``, in its manifest), checked as a user file is."""
    classes = data.get("classes") if isinstance(data, dict) else None
    prompts = data.get("prompts", classes) if isinstance(data, dict) else None
    if not isinstance(classes, list) or not isinstance(prompts, list) or len(prompts) != len(classes):
        raise ClassSetError("the recorded class set needs a 'classes' list (and as many 'prompts')")
    entries = [{"name": c, "prompt": p} for c, p in zip(classes, prompts, strict=True)]
    # a run records a user file's set without its name (null): the file's name is not part of the set
    name = data.get("name") or "recorded"
    return _from_mapping({**{k: v for k, v in data.items() if k in _KEYS}, "name": name, "classes": entries}, name)


def _parse_text(text: str, name: str) -> dict:
    """Plain text: one class per line, ``name`` or ``name: synonym, synonym``; ``#`` comments."""
    classes = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        cls, _, syn = line.partition(":")
        classes.append({"name": cls.strip(), "synonyms": [s.strip() for s in syn.split(",") if s.strip()]})
    return {"name": name, "classes": classes}


def builtin_class_sets() -> list[str]:
    """Names of the class sets shipped with clipes."""
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir() if p.name.endswith(".yaml"))


def load_class_set(spec: str | Path) -> ClassSet:
    """Load a built-in set by name (``voc``, ``coco``) or a user file (YAML or plain text)."""
    spec_str = str(spec)
    if spec_str in builtin_class_sets():
        text = resources.files(__package__).joinpath(f"{spec_str}.yaml").read_text(encoding="utf-8")
        return _from_mapping(yaml.safe_load(text), spec_str)
    path = Path(spec_str)
    if not path.is_file():
        raise ClassSetError(f"--classes {spec_str!r} is neither a built-in class set "
                            f"({', '.join(builtin_class_sets())}) nor an existing file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ClassSetError(f"{path}: cannot read class set ({e})") from e
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:  # on one line: PyYAML's message spans several
            raise ClassSetError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from e
    else:
        data = _parse_text(text, path.stem)
    try:
        return _from_mapping(data, path.stem)
    except ClassSetError as e:  # name the file once, not also the set it would have been
        why = re.sub(r"^class set '[^']*': ", "", str(e)).removeprefix(f"{path.stem}: ")
        raise ClassSetError(f"{path}: {why}") from e
