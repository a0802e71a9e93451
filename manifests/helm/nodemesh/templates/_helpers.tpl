{{/*
nodemesh.namespace is the release namespace, which must be nodemesh-system:
the agents keep their node marks (Leases) there and read mesh-wide policy
from there (agent/rollout, agent/policy), whatever namespace they run in.
*/}}
{{- define "nodemesh.namespace" -}}
{{- if ne .Release.Namespace "nodemesh-system" -}}
{{- fail (printf "nodemesh installs into the namespace nodemesh-system, not %q: the agents keep their node marks and read mesh-wide policy there. Run helm with --namespace nodemesh-system." .Release.Namespace) -}}
{{- end -}}
{{- .Release.Namespace -}}
{{- end -}}

{{/*
nodemesh.labels are the labels of every object: part-of (uninstall selects
by it, as in the kustomize base) and Helm's own.
*/}}
{{- define "nodemesh.labels" -}}
app.kubernetes.io/part-of: nodemesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
nodemesh.image renders repository:tag, or repository@digest when a digest
is set. Call with (list $ .Values.agent.image).
*/}}
{{- define "nodemesh.image" -}}
{{- $root := index . 0 -}}
{{- $img := index . 1 -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default $root.Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}
