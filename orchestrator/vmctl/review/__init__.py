"""Review mode: the guest works on a private copy; the user decides what lands.

`vmctl up --review` snapshots the workspace into `reviews/NAME/work`
(`snapshot`), the guest shares only that copy, `vmctl diff` compares it
with the snapshot (`changes`), and `vmctl apply` lands chosen changes in
the user's folder where the user's files still match the snapshot
(`land`). The copy lives outside the instance folder, so it outlives an
ephemeral guest until it is applied or removed.
"""
