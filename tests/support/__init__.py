"""What the tests, the demo and the bench share: the lab and its inventory, the playbook
and lab-command runners, client settings and TLS for the cluster, the drills' ledger, polling.

Importable as ``support`` because the venv's celery-ha-repo.pth (Makefile, venv) puts
tests/ on the path, with app/boot/src and app/src.
"""
