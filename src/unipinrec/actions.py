"""Action vocabularies: the `action` enum, defined once per dataset (docs/data.md).

Which actions count as positive for retrieval, and which binary tasks the ranker predicts,
is configuration (`TaskConfig`), resolved against a vocabulary here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActionVocab:
    """Action names indexed by action id. Id 0 is always `impression` (shown, not engaged)."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names or self.names[0] != "impression":
            raise ValueError("an action vocabulary starts with 'impression' (id 0)")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate action names in {self.names}")

    @property
    def size(self) -> int:
        return len(self.names)

    def id(self, name: str | int) -> int:
        """Action id of a name (or an id passed through after a range check)."""
        if isinstance(name, int):
            if not 0 <= name < self.size:
                raise ValueError(f"action id {name} is not in the vocabulary {list(self.names)}")
            return name
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown action '{name}'; the vocabulary is {list(self.names)}") from None

    def ids(self, names) -> tuple[int, ...]:
        return tuple(self.id(n) for n in names)


SYNTHETIC = ActionVocab(("impression", "click", "save", "share", "hide"))
# MovieLens: the action is the star rating; id == stars.
MOVIELENS = ActionVocab(("impression", "rating_1", "rating_2", "rating_3", "rating_4", "rating_5"))

VOCABS: dict[str, ActionVocab] = {"synthetic": SYNTHETIC, "movielens": MOVIELENS}


def vocab_for(source: str) -> ActionVocab:
    """The vocabulary of a data source name (`synthetic`, `movielens-1m`, `movielens-100k`...)."""
    key = "movielens" if source.startswith("movielens") else source
    if key not in VOCABS:
        raise ValueError(f"no action vocabulary for source '{source}'; known: {sorted(VOCABS)}")
    return VOCABS[key]
