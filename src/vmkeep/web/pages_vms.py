"""The VM pages: ``/vms`` (every VM's state, protection, last backup and drill, and the buttons
its state and the viewer's role allow) and ``/vms/{name}`` (its chains as a timeline, freeze
times, drill evidence, history, and plots of backup size and duration). ``POST /act/{kind}``
queues any action of the table from a page's form."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response

from vmkeep.engine.core import stores
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.lifecycle import dispatch
from vmkeep.engine.points import listing
from vmkeep.engine.service import overview
from vmkeep.engine.vm import inventory
from vmkeep.names import MAX_ID
from vmkeep.web import buttons
from vmkeep.web import render as R
from vmkeep.web.base import Web
from vmkeep.web.session import Posted

FILTERS = ("protected", "stale", "unprotected", "failed")
PAGE = 100  # VMs a page shows (then a link to the next page, keyset on the VM's id)
NOT_PARAMS = ("csrf", "next")  # form fields that are the page's, not the action's


def routes(web: Web, app: FastAPI) -> None:
    r = web.router()

    @r.get("/vms")
    def vm_list(
        request: Request, state: str = "", after: int = Query(default=0, ge=0, le=MAX_ID),
        who: Actor = web.page_actor,
    ) -> Response:  # fmt: skip
        ctx = web.ctx()
        vms = inventory.list_vms(ctx)
        if state in FILTERS:  # a filter needs every VM's facts to fill a page
            facts = overview.vm_states(ctx)
        else:  # only this page's: 100 VMs' points and jobs, not 1,000
            page = [vm["name"] for vm in vms if vm["id"] > after][:PAGE]
            facts = overview.vm_states(ctx, page) if page else {}
        rows: list[dict[str, Any]] = []
        for vm in vms:
            if vm["id"] <= after:
                continue
            if len(rows) == PAGE:
                break
            f = facts.get(vm["name"]) or {"state": "unprotected", "last_point": None,
                                          "last_size": None, "last_drill": None, "failed": False}  # fmt: skip
            if state in FILTERS and not (f["failed"] if state == "failed" else f["state"] == state):
                continue
            rows.append(
                {
                    "vm": vm,
                    "f": f,
                    "buttons": buttons.vm_buttons(web, who, vm),
                    "backup": buttons.can_backup(web, who, vm),
                }  # fmt: skip
            )
        names = [d["name"] for d in stores.list_all(ctx)] if rows else []
        shown = state if state in FILTERS else ""
        more = len(rows) == PAGE and rows[-1]["vm"]["id"] != vms[-1]["id"]
        return web.render(request, "vms.html", title="VMs", rows=rows, total=len(vms),
                          state=shown, filters=FILTERS, datastores=names, after=after,
                          next_after=rows[-1]["vm"]["id"] if more else None)  # fmt: skip

    @r.get("/vms/{name}")
    def vm_page(request: Request, name: str, who: Actor = web.page_actor) -> Response:
        ctx = web.ctx()
        vm = inventory.show_vm(ctx, name)
        chains = listing.list_backups(ctx, name)
        facts = overview.vm_states(ctx, [vm["name"]]).get(vm["name"])
        history = list(reversed(dispatch.history(ctx, name)))[:50]
        points = [(inc, b) for b in chains for inc in b["increments"]]
        points.sort(key=lambda p: str(p[0]["started"] or ""))
        sizes = [(inc["finished"], inc["size"]) for inc, _ in points if inc["status"] == "VALID"]
        times = [
            (inc["finished"], R.between(inc["started"], inc["finished"]))
            for inc, _ in points
            if inc["status"] == "VALID"
        ]
        drills = [(inc, b) for inc, b in points if inc.get("last_drill")]
        marks = {(b["id"], inc["id"]): buttons.point_buttons(web, who, b, inc) for inc, b in points}
        chain_marks = {b["id"]: buttons.chain_buttons(web, who, b) for b in chains}
        names = [d["name"] for d in stores.list_all(ctx)]
        return web.render(
            request, "vm.html", chain_marks=chain_marks, title=vm["name"], vm=vm, f=facts, chains=list(reversed(chains)),
            history=history, drills=drills, marks=marks, datastores=names,
            vm_buttons=buttons.vm_buttons(web, who, vm), backup=buttons.can_backup(web, who, vm),
            size_plot=R.plot(sizes, f"Backup size of {vm['name']}", "bytes"),
            time_plot=R.plot(times, f"Backup duration of {vm['name']}", "seconds"),
        )  # fmt: skip

    @r.post("/act/{kind}")
    def act(kind: str, posted: Posted = web.form_actor(None)) -> Response:
        """Any action of the table, its params from the form (the role and checks are the
        action's: ``Web.act``)."""
        data: dict[str, Any] = {k: v for k, v in posted.form.multi_items() if k not in NOT_PARAMS}
        return web.act(posted.actor, kind, data)

    app.include_router(r)
