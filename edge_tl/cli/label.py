"""`edge-tl label DIR --out LABELLED`: label the captured pictures in a local web page, by keyboard. Thin: the work
is in edge_tl.workstation.label; the model's suggestions come from the bundle's classifier (edge_tl.device.infer),
wired here because the workstation does not import the device's runners."""

from __future__ import annotations

from pathlib import Path

import typer

from edge_tl.cli._common import Backend, _v


def label_cmd(
    folder: Path = typer.Argument(..., metavar="DIR", help="The pictures: what edge-tl collect wrote, or any folder "
                                  "of images (only read, never changed)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where the labelled copies go, one folder per class, with "
                             "labels.log.jsonl; the --out of an earlier run resumes it."),
    bundle: Path | None = typer.Option(None, "--bundle", "-b", help="A bundle: its classes, and its model suggests "
                                       "a class for the pictures without a sidecar's scores."),
    classes: str | None = typer.Option(None, "--classes", help="The classes, comma-separated (instead of the "
                                       "bundle's, e.g. to add a new one)."),
    run: Path | None = typer.Option(None, "--run", help="A finished build's run folder: its bundle (as --bundle) "
                                    "and a Grad-CAM overlay of the suggested class beside each picture (the pruned "
                                    "model, on the workstation's torch).", show_default=False),
    backend: Backend = typer.Option(Backend.auto, "--backend", help="Runtime of the bundle's model."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (the page has no login: keep it "
                             "local)."),
    port: int = typer.Option(0, "--port", help="Port to listen on (0: any free one; the address is printed)."),
    no_open: bool = typer.Option(False, "--no-open", help="Do not open a browser."),
) -> None:
    """Label pictures in a local web page, each shown with the model's suggestion, by keyboard.

    Enter/a accepts the suggestion, 1..9 picks a class, s skips, u undoes. Each decided picture is copied to
    OUT/<class>/ and logged in OUT/labels.log.jsonl."""
    from rich.console import Console
    from rich.markup import escape

    from edge_tl.core.errors import EdgeTLError
    from edge_tl.workstation.label import LabelServer, LabelSession, check_folders, parse_classes

    err = Console(stderr=True, highlight=False)
    check_folders(folder, out)  # before a bundle is opened
    if classes is None and bundle is None and run is None:
        raise EdgeTLError("no classes to label with", "give --bundle B (its classes), --run RUN or --classes a,b,c")
    names = parse_classes(classes) if classes is not None else None
    suggest, bundle_id, classifier, explain = None, None, None, None
    if run is not None:
        from edge_tl.core import importer

        explain, b = importer.require_workstation("edge_tl.workstation.explain", "edge-tl label --run").run_explainer(
            run)
        if bundle is not None and Path(bundle).resolve() != b.root.resolve():
            raise EdgeTLError(f"--bundle {bundle} is not the bundle of --run {run}", "give one of them")
        bundle = b.root
    if bundle is not None:
        from edge_tl.core.bundle import Bundle
        from edge_tl.device.infer import Classifier

        b = Bundle.open(bundle)
        bundle_id = b.manifest.bundle_id
        names = names or b.labels
        classifier = Classifier.load(b, _v(backend))
        suggest = lambda image: classifier.classify([image], k=5)[0]  # noqa: E731
    try:
        session = LabelSession(folder, out, names or [], suggest=suggest, bundle_id=bundle_id, explain=explain)
        for line in session.problems:
            err.print(f"[yellow]{escape(line)}[/]", soft_wrap=True)
        total, left = len(session.order), len(session.pending)
        if not left:
            err.print(escape(f"nothing left to label: the {total} picture(s) of {folder} are decided in "
                             f"{out / 'labels.log.jsonl'}"), soft_wrap=True)
            return
        server = LabelServer(session, host, port)
        if host not in ("127.0.0.1", "localhost", "::1"):
            err.print(f"[yellow]listening on {escape(host)}: anyone who reaches this port can label[/]")

        def ready(url: str) -> None:
            err.print(escape(f"labelling {left} of {total} picture(s) at {url} (Ctrl-C stops; every decision is "
                             f"saved as it is made)"), soft_wrap=True)
            if not no_open:
                import webbrowser

                webbrowser.open(url)

        server.run(on_ready=ready)
        st = session.state()
        counts = ", ".join(f"{k} {v}" for k, v in st["counts"].items())
        err.print(escape(f"{st['decided']} of {st['total']} decided: {counts}, skipped {st['skipped']}"),
                  soft_wrap=True)
    finally:
        if classifier is not None:
            classifier.close()


def register(app: typer.Typer) -> None:
    app.command("label")(label_cmd)
