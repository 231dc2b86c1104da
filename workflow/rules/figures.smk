# Every figure and table, drawn from the result tables alone (natgrad_impls.figures). Each figure
# rule writes the PNG, the PDF and its caption: workflow/report/<figure>.rst followed by the notes
# of this run (an optimizer absent from the table, a chaotic best run, ...).

_labels = report_labels()

for _figure, (_category, _inputs) in figures().items():

    rule:
        name:
            f"figure_{_figure.replace('-', '_')}"
        input:
            _inputs,
            caption=f"workflow/report/{_figure}.rst",  # (an input: a caption's edit redraws it)
        output:
            png=report(f"{RESULTS}/figures/{_figure}.png", caption=f"../../{RESULTS}/figures/{_figure}.rst",
                       category=_category, labels=_labels[_figure]),
            pdf=f"{RESULTS}/figures/{_figure}.pdf",
            caption=f"{RESULTS}/figures/{_figure}.rst",
        conda:
            ENVIRONMENT
        log:
            f"{LOGS}/figures/{_figure}.log",
        params:
            figure=_figure,
            code=drawn_by(),
        threads: 1
        localrule: True  # on a cluster: seconds of drawing, not a job in the queue
        script:
            "../scripts/figure.py"


for _table, (_category, _inputs) in tables().items():

    rule:
        name:
            f"table_{_table.replace('-', '_')}"
        input:
            **_inputs,
        output:
            csv=f"{RESULTS}/tables/{_table}.csv",
            # the report shows the HTML page (it offers a CSV only as a download)
            html=report(f"{RESULTS}/tables/{_table}.html", caption=f"../report/{_table}.rst", category=_category,
                        labels=_labels[_table]),
        conda:
            ENVIRONMENT
        log:
            f"{LOGS}/tables/{_table}.log",
        params:
            table=_table,
            code=drawn_by(),
        threads: 1
        localrule: True
        script:
            "../scripts/table.py"
