HELP = "print a bash completion script (verbs and their options): eval \"$(ddp-cluster completion bash)\""

# Static: the words are this version's verbs and options, written into the script once (a shell
# completes without starting python); after them, file names (job files, inventories)
_SCRIPT = r'''# bash completion for ddp-cluster (eval "$(ddp-cluster completion bash)", or save it under
# ~/.local/share/bash-completion/completions/ddp-cluster)
_ddp_cluster() {
    local cur=${COMP_WORDS[COMP_CWORD]} opts=
    if [ "$COMP_CWORD" -le 1 ]; then
        COMPREPLY=($(compgen -W "%(verbs)s" -- "$cur")); return
    fi
    case "${COMP_WORDS[1]}" in
%(cases)s
    esac
    [[ "$cur" == -* ]] && COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}
complete -o default -F _ddp_cluster ddp-cluster
'''


def add_arguments(p):
    p.add_argument("shell", choices=["bash"], help="the shell (bash)")


def script() -> str:
    from cluster.cli import parser
    ap, _ = parser()
    sub = next(a for a in ap._actions if a.dest == "verb")
    cases = []
    for verb, p in sub.choices.items():
        opts = sorted(o for a in p._actions for o in a.option_strings)
        cases.append(f'        {verb}) opts="{" ".join(opts)}" ;;')
    return _SCRIPT % {"verbs": " ".join(sub.choices), "cases": "\n".join(cases)}


def run(args):
    print(script(), end="")
    return 0
