# The daemon's data: a tree of nodes with permissions, and transactions.
#
# Rules (those of C xenstored's core.c, see docs/xenstore.md):
# - Nodes are immutable; a change copies the path from the root down
#   (``Tree._put``), so a transaction's snapshot is just the root it started
#   from.  Each node has a generation, renewed only when *that* node changes
#   (value, permissions, or the set of its children).
# - Access follows perms.access_for; a missing node answers ENOENT only if
#   the nearest existing ancestor grants the access asked for, else EACCES,
#   so unreadable parts of the tree do not leak which nodes exist.
# - New nodes inherit the parent's permissions; an unprivileged creator
#   becomes their owner.  Quotas bind unprivileged domains only.
# - A transaction works on its own copy and records every path it looked at.
#   Commit fails with EAGAIN if any of those nodes changed generation since
#   the snapshot; otherwise its logged operations are replayed onto the live
#   tree, which yields the watch events to fire.
#
# Operations raise ``StoreError(errno_name)`` and return a list of ``Change``
# for the watch machinery; nothing here knows about connections or sockets.
import itertools
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .perms import OWNER, READ, WRITE, Perm, access_for

#: Quotas applied to unprivileged domains, as xenstored's defaults.
DEFAULT_QUOTAS = {
    "nodes": 1000,          # nodes owned per domain (-E / ACC_NODES)
    "node_size": 2048,      # bytes of value + child names per node (-S)
    "perms": 5,             # permission entries per node (-A)
    "watches": 128,         # watches per domain (-W)
    "transactions": 10,     # open transactions per domain (-t)
    "path": 2048,           # path length below /local/domain/N/ (-M)
    "rate": 200,            # requests per second per domain, sustained (0: no limit)
    "burst": 2000,          # requests per domain at once before "rate" holds them back
}

SPECIAL_NODES = ("@introduceDomain", "@releaseDomain")


class StoreError(Exception):
    """An operation failed with the xsd_errors name ``name``."""

    def __init__(self, name):
        super().__init__(name)
        self.name = name


@dataclass(frozen=True)
class Caller:
    """Who asks: the connection's domain, its privilege and target."""

    domid: int
    privileged: bool = False
    target: Optional[int] = None


DOM0 = Caller(0, privileged=True)


@dataclass(frozen=True)
class Change:
    """One node changed: fire watches on ``path``.

    ``exact``: only watches on exactly this path fire (children of a removed
    node), otherwise watches on the path or any ancestor.  A watcher sees the
    event if any permission set in ``visible_to`` lets it read.
    """

    path: str
    exact: bool
    visible_to: Tuple[Tuple[Perm, ...], ...]


class Node:
    """An immutable node: value bytes, perms tuple, children dict, generation."""

    __slots__ = ("value", "perms", "children", "gen")

    def __init__(self, value, perms, children, gen):
        self.value = value
        self.perms = perms
        self.children = children
        self.gen = gen

    def replace(self, gen, **changes):
        fields = {"value": self.value, "perms": self.perms,
                  "children": self.children}
        fields.update(changes)
        return Node(gen=gen, **fields)

    @property
    def owner(self):
        return self.perms[0].domid

    def size(self):
        """What the node-size quota counts: value plus NUL-terminated child names."""
        return len(self.value) + sum(len(c) + 1 for c in self.children)


def split(path):
    """``"/a/b"`` -> ``["a", "b"]``; the root is ``[]``."""
    return [p for p in path.split("/") if p]


def parent_of(path):
    """Parent path as xenstored's get_parent (special nodes hang off "/")."""
    cut = path.rfind("/", 1)
    return path[:cut] if cut > 0 else "/"


def join(parent, name):
    return "/" + name if parent == "/" else parent + "/" + name


class Tree:
    """One version of the store; cheap to clone (the root is shared)."""

    def __init__(self, root, specials, owners, next_gen, quotas, track=False):
        self.root = root
        self.specials = specials        # "@introduceDomain" -> Node
        self.owners = owners            # domid -> nodes owned
        self._next_gen = next_gen
        self.quotas = quotas
        self.accessed = set() if track else None

    @classmethod
    def initial(cls, next_gen, quotas=None):
        """The tree xenstored starts with: /, /tool, /tool/xenstored, specials."""
        perms = (Perm("n", 0),)
        xenstored = Node(b"", perms, {}, next_gen())
        tool = Node(b"", perms, {"xenstored": xenstored}, next_gen())
        root = Node(b"", perms, {"tool": tool}, next_gen())
        specials = {name: Node(b"", perms, {}, next_gen()) for name in SPECIAL_NODES}
        return cls(root, specials, {0: 5}, next_gen,
                   dict(DEFAULT_QUOTAS if quotas is None else quotas))

    def clone(self, track=False):
        return Tree(self.root, dict(self.specials), dict(self.owners),
                    self._next_gen, self.quotas, track)

    # Lookup.

    def lookup(self, path):
        """The node at ``path`` or None, without recording the access."""
        if path.startswith("@"):
            return self.specials.get(path)
        node = self.root
        for name in split(path):
            node = node.children.get(name)
            if node is None:
                return None
        return node

    def _get(self, path):
        if self.accessed is not None:
            self.accessed.add(path)
        return self.lookup(path)

    def generation(self, path):
        node = self.lookup(path)
        return None if node is None else node.gen

    def walk(self, path="/"):
        """(path, node) for ``path`` and every node below it, parents first."""
        stack = [(path, self.lookup(path))]
        while stack:
            path, node = stack.pop()
            if node is None:
                continue
            yield path, node
            for name in reversed(list(node.children)):
                stack.append((join(path, name), node.children[name]))

    def _walk_post(self, path):
        """(path, node) below and at ``path``, each child's subtree before it."""
        stack = [(path, self.lookup(path), False)]
        while stack:
            path, node, expanded = stack.pop()
            if expanded:
                yield path, node
                continue
            stack.append((path, node, True))
            for name in reversed(list(node.children)):
                stack.append((join(path, name), node.children[name], False))

    # Permission checks, as get_node_chk_perm() and errno_from_parents().

    def _nearest_ancestor(self, path):
        while path != "/":
            path = parent_of(path)
            node = self._get(path)
            if node is not None:
                return node
        return self._get("/")

    def _checked(self, caller, path, want):
        node = self._get(path)
        if node is not None:
            have = access_for(caller.domid, node.perms, caller.privileged,
                              caller.target)
            if have & want == want:
                return node
            error = "EACCES"
        else:
            error = "ENOENT"
        ancestor = self._nearest_ancestor(path)
        have = access_for(caller.domid, ancestor.perms, caller.privileged,
                          caller.target)
        raise StoreError(error if have & want else "EACCES")

    # Structural updates (path copying).

    def _put(self, path, node):
        """Set (or with ``node=None`` remove) the node at ``path``."""
        if path.startswith("@"):
            self.specials[path] = node
            return
        names = split(path)
        chain = [self.root]
        for name in names[:-1]:
            chain.append(chain[-1].children[name])
        new = node
        for depth in range(len(names) - 1, -1, -1):
            parent, name = chain[depth], names[depth]
            children = dict(parent.children)
            if new is None:
                del children[name]
            else:
                children[name] = new
            gen = parent.gen
            if (new is None) or (name not in parent.children):
                gen = self._next_gen()       # the child set changed
            new = parent.replace(gen, children=children)
        self.root = new

    def _count(self, domid, delta):
        self.owners[domid] = self.owners.get(domid, 0) + delta

    def _check_size(self, caller, node_size):
        if not caller.privileged and node_size > self.quotas["node_size"]:
            raise StoreError("ENOSPC")

    # Operations.  Each takes the Caller and canonical absolute paths.

    def read(self, caller, path):
        return self._checked(caller, path, READ).value

    def directory(self, caller, path):
        return list(self._checked(caller, path, READ).children)

    def node_generation(self, caller, path):
        return self._checked(caller, path, READ).gen

    def get_perms(self, caller, path):
        return self._checked(caller, path, READ).perms

    def write(self, caller, path, value):
        try:
            node = self._checked(caller, path, WRITE)
        except StoreError as e:
            if e.name != "ENOENT":
                raise
            node = self._create(caller, path, value)
        else:
            self._check_size(caller, len(value) + node.size() - len(node.value))
            node = node.replace(self._next_gen(), value=value)
            self._put(path, node)
        return [self._change(path, node)]

    def mkdir(self, caller, path):
        try:
            self._checked(caller, path, WRITE)
        except StoreError as e:
            if e.name != "ENOENT":
                raise
            return [self._change(path, self._create(caller, path, b""))]
        return []

    def rm(self, caller, path):
        try:
            self._checked(caller, path, WRITE)
        except StoreError as e:
            if e.name == "ENOENT" and self._get(parent_of(path)) is not None:
                return []
            raise
        if path == "/":
            raise StoreError("EINVAL")
        parent = self._get(parent_of(path))
        changes = []
        for sub, node in self._walk_post(path):  # children first, as xenstored
            if self.accessed is not None:
                self.accessed.add(sub)
            self._count(node.owner, -1)
            above = parent if sub == path else self.lookup(parent_of(sub))
            changes.append(Change(sub, sub != path, (node.perms, above.perms)))
        self._put(path, None)
        return changes

    def set_perms(self, caller, path, perms):
        perms = tuple(perms)
        if not caller.privileged and len(perms) > self.quotas["perms"]:
            raise StoreError("ENOSPC")
        node = self._checked(caller, path, WRITE | OWNER)
        if not caller.privileged and perms[0].domid != node.owner:
            raise StoreError("EPERM")
        self._count(node.owner, -1)
        self._count(perms[0].domid, +1)
        new = node.replace(self._next_gen(), perms=perms)
        self._put(path, new)
        parent = self.lookup(parent_of(path))
        return [Change(path, path.startswith("@"),
                       (node.perms, perms, parent.perms))]

    def _create(self, caller, path, value):
        """Create ``path`` and missing ancestors (construct_node + create_node)."""
        missing = [path]
        parent_path = parent_of(path)
        parent = self._get(parent_path)
        while parent is None:
            missing.append(parent_path)
            parent_path = parent_of(parent_path)
            parent = self._get(parent_path)
        owner = caller.domid if not caller.privileged else None
        self._check_size(caller, len(value))
        for sub in reversed(missing):
            if not caller.privileged and (
                    self.owners.get(caller.domid, 0) >= self.quotas["nodes"]):
                raise StoreError("ENOSPC")
            perms = parent.perms
            if owner is not None:
                perms = (Perm(perms[0].access, owner),) + perms[1:]
            node = Node(value if sub == path else b"", perms, {}, self._next_gen())
            self._put(sub, node)
            self._count(node.owner, +1)
            parent = node
        return parent

    def _change(self, path, node):
        parent = self.lookup(parent_of(path))
        return Change(path, False, (node.perms, parent.perms))


@dataclass
class Transaction:
    """An open transaction: the snapshot, its working copy, its replay log."""

    id: int
    caller: Caller
    snapshot: Tree
    work: Tree
    log: list = field(default_factory=list)

    def apply(self, method, *args):
        """Run a store operation inside the transaction (events are deferred)."""
        result = getattr(self.work, method)(self.caller, *args)
        if method in MUTATIONS:
            self.log.append((method, args))
        return result


#: Tree methods that change the store (logged in transactions, replayed on commit).
MUTATIONS = frozenset({"write", "mkdir", "rm", "set_perms"})


class Store:
    """The live tree plus transaction bookkeeping."""

    def __init__(self, quotas=None):
        counter = itertools.count(1)
        self._next_gen = lambda: next(counter)
        self.tree = Tree.initial(self._next_gen, quotas)
        self._tx_ids = itertools.count(1)

    @property
    def quotas(self):
        return self.tree.quotas

    def apply(self, caller, method, *args):
        """Run an operation on the live tree; mutations return [Change]."""
        return getattr(self.tree, method)(caller, *args)

    def begin(self, caller):
        tx_id = next(self._tx_ids) & 0xFFFFFFFF or next(self._tx_ids)
        return Transaction(tx_id, caller, self.tree.clone(),
                           self.tree.clone(track=True))

    def commit(self, tx):
        """Apply ``tx`` to the live tree and return its Changes, or raise EAGAIN."""
        for path in tx.work.accessed:
            if tx.snapshot.generation(path) != self.tree.generation(path):
                raise StoreError("EAGAIN")
        candidate = self.tree.clone()
        changes = []
        for method, args in tx.log:
            changes.extend(getattr(candidate, method)(tx.caller, *args))
        self.tree = candidate
        return changes
