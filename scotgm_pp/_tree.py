"""Results as ``xarray.DataTree``, the container of ArviZ 1 and PyMC 6.

A result tree has an empty root that carries the attrs and one child per group
(``posterior``, ``observed_data``, ``map_estimate``, ...), each holding a Dataset. These few
helpers keep the rest of the package from spelling DataTree details (``tree.groups`` is a tuple
of paths such as ``"/posterior"``, not group names; a node is not a Dataset) in many places.
"""

from __future__ import annotations

from collections.abc import Mapping

import xarray as xr

__all__ = ["make_tree", "has_group", "group", "set_group", "drop_group", "group_names"]


def make_tree(groups: Mapping[str, xr.Dataset], attrs: Mapping | None = None) -> xr.DataTree:
    """A DataTree with one child per group and ``attrs`` on its root."""
    nodes: dict[str, xr.Dataset] = {"/": xr.Dataset(attrs=dict(attrs or {}))}
    for name, ds in groups.items():
        if ds is None:
            continue
        nodes[name] = ds.to_dataset() if isinstance(ds, xr.DataTree) else ds
    return xr.DataTree.from_dict(nodes)


def group_names(tree: xr.DataTree | None) -> list[str]:
    """The tree's group names (its root's children)."""
    return [] if tree is None else list(tree.children)


def has_group(tree: xr.DataTree | None, name: str) -> bool:
    """Whether ``tree`` has a group called ``name``."""
    return tree is not None and name in tree.children


def group(tree: xr.DataTree, name: str) -> xr.Dataset:
    """Group ``name`` of ``tree`` as a Dataset (a copy-free view converted to a Dataset)."""
    if not has_group(tree, name):
        raise KeyError(f"the tree has no {name!r} group; its groups are {group_names(tree)}.")
    return tree[name].to_dataset()


def set_group(tree: xr.DataTree, name: str, ds: xr.Dataset) -> None:
    """Put ``ds`` in ``tree`` as group ``name``, replacing a group of that name."""
    if has_group(tree, name):
        del tree[name]
    tree[name] = ds.to_dataset() if isinstance(ds, xr.DataTree) else ds


def drop_group(tree: xr.DataTree, name: str) -> None:
    """Remove group ``name`` from ``tree`` if it is there."""
    if has_group(tree, name):
        del tree[name]
