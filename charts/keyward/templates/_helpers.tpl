{{/*
Shared pieces. Cluster-scoped objects have fixed names (keyward-viewer, keyward-operator, ...): one
installation per cluster, as there is one set of CRDs.
*/}}

{{- define "keyward.labels" -}}
app.kubernetes.io/name: keyward
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- if .Values.helmLabels }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "operator") */}}
{{- define "keyward.selectorLabels" -}}
app.kubernetes.io/name: keyward
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* An image reference: (dict "root" $ "image" .Values.image.plugin) */}}
{{- define "keyward.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) -}}
{{- end }}

{{/* The container security context of every Keyward container. */}}
{{- define "keyward.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end }}

{{/* The pod security context: the fixed non-root user that owns the node's HSM files. */}}
{{- define "keyward.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.hsm.runAsUser }}
runAsGroup: {{ .Values.hsm.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The PKCS#11 settings as environment (keyward/hsm/config.py): (dict "root" $ "pinFile" PATH) */}}
{{- define "keyward.hsmEnv" -}}
- name: KEYWARD_PKCS11_MODULE
  value: {{ .root.Values.hsm.modulePath | quote }}
- name: KEYWARD_TOKEN_LABEL
  value: {{ .root.Values.hsm.tokenLabel | quote }}
- name: KEYWARD_PIN_FILE
  value: {{ .pinFile | quote }}
{{- range $name, $value := .root.Values.hsm.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}

{{/* Node folders (config read-only, state read-write, vendor module read-only), at the same paths. */}}
{{- define "keyward.nodeVolumes" -}}
- name: hsm-config
  hostPath:
    path: {{ .Values.hsm.configHostPath }}
    type: Directory
- name: hsm-state
  hostPath:
    path: {{ .Values.hsm.stateHostPath }}
    type: Directory
{{- if .Values.hsm.moduleHostPath }}
- name: hsm-module
  hostPath:
    path: {{ .Values.hsm.moduleHostPath }}
    type: Directory
{{- end }}
{{- end }}

{{- define "keyward.nodeVolumeMounts" -}}
- name: hsm-config
  mountPath: {{ .Values.hsm.configHostPath }}
  readOnly: true
- name: hsm-state
  mountPath: {{ .Values.hsm.stateHostPath }}
{{- if .Values.hsm.moduleHostPath }}
- name: hsm-module
  mountPath: {{ .Values.hsm.moduleHostPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The key store's lock file: on the node's state folder, so that every writer on the node shares it. */}}
{{- define "keyward.storeLock" -}}
{{ printf "%s/store.lock" (trimSuffix "/" .Values.hsm.stateHostPath) }}
{{- end }}

{{/*
The plugin's pod spec, shared by the static pod and the DaemonSet. hostNetwork: the plugin must not
depend on the cluster network, which itself depends on the apiserver. No service account: the plugin never
talks to the apiserver.
*/}}
{{- define "keyward.plugin.podSpec" -}}
hostNetwork: true
priorityClassName: system-node-critical
automountServiceAccountToken: false
securityContext:
  {{- include "keyward.podSecurityContext" . | nindent 2 }}
containers:
  - name: kms-plugin
    image: {{ include "keyward.image" (dict "root" . "image" .Values.image.plugin) }}
    imagePullPolicy: {{ .Values.image.plugin.pullPolicy }}
    args:
      - plugin
      - serve
      - --socket={{ .Values.plugin.socketPath }}
      - --key={{ .Values.plugin.keyName }}
      - --log-level={{ .Values.plugin.logLevel }}
    env:
      {{- include "keyward.hsmEnv" (dict "root" . "pinFile" .Values.hsm.pinFile) | nindent 6 }}
      - name: KEYWARD_STORE_LOCK
        value: {{ include "keyward.storeLock" . | quote }}
    # Alive while it answers Status over its socket; an HSM outage is reported, not restarted.
    livenessProbe:
      exec:
        command: [keyward, plugin, check, --socket={{ .Values.plugin.socketPath }}, --timeout=5]
      initialDelaySeconds: 15
      periodSeconds: 30
      timeoutSeconds: 10
      failureThreshold: 3
    resources:
      {{- toYaml .Values.plugin.resources | nindent 6 }}
    securityContext:
      {{- include "keyward.containerSecurityContext" . | nindent 6 }}
    volumeMounts:
      {{- include "keyward.nodeVolumeMounts" . | nindent 6 }}
      - name: socket
        mountPath: {{ dir .Values.plugin.socketPath }}
      - name: tmp
        mountPath: /tmp
volumes:
  {{- include "keyward.nodeVolumes" . | nindent 2 }}
  # Must exist, owned by hsm.runAsUser (a systemd-tmpfiles rule: /run is emptied on boot).
  - name: socket
    hostPath:
      path: {{ dir .Values.plugin.socketPath }}
      type: Directory
  - name: tmp
    emptyDir:
      medium: Memory
      sizeLimit: 16Mi
{{- end }}

{{/*
An EncryptionConfiguration: (dict "root" $ "step" N). Turning encryption on in a running cluster takes three
steps, each rolled out to every control-plane node before the next (docs/install-kubeadm.md):
  1 read:     identity first (writes stay plaintext), the plugin second (what another node encrypted is read)
  2 encrypt:  the plugin first (new writes are encrypted), identity second (old plaintext is still read)
  3 kms-only: the plugin alone, once every stored object has been re-encrypted
*/}}
{{- define "keyward.encryptionConfig" -}}
{{- $v := .root.Values -}}
{{- $kms := dict "kms" (dict "apiVersion" "v2" "name" $v.encryption.providerName "endpoint" (printf "unix://%s" $v.plugin.socketPath) "timeout" $v.encryption.timeout) -}}
{{- $identity := dict "identity" (dict) -}}
{{- $providers := list $kms $identity -}}
{{- if eq .step 1 }}{{ $providers = list $identity $kms }}{{ end -}}
{{- if eq .step 3 }}{{ $providers = list $kms }}{{ end -}}
apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources:
      {{- toYaml $v.encryption.resources | nindent 6 }}
    providers:
      {{- toYaml $providers | nindent 6 }}
{{- end }}

{{/*
One RBAC rule for a resource the operator re-encrypts: "secrets" and "configmaps" are in the core group,
"widgets.example.com" is resource widgets in group example.com.
*/}}
{{- define "keyward.reencryptRule" -}}
{{- $parts := splitn "." 2 . -}}
- apiGroups: [{{ $parts._1 | default "" | quote }}]
  resources: [{{ $parts._0 }}]
  verbs: [list, patch]
{{- end }}

{{/* What people may read: shared by the three people's roles. */}}
{{- define "keyward.viewRules" -}}
- apiGroups: [keyward.io]
  resources: [encryptionkeys, rotationpolicies]
  verbs: [get, list, watch]
{{- end }}

{{/*
Checks that need a sentence more than the schema can say. Rendered by every object-producing template
through templates/validate.yaml.
*/}}
{{- define "keyward.validate" -}}
{{- $v := .Values -}}
{{- $config := trimSuffix "/" $v.hsm.configHostPath -}}
{{- if not (hasPrefix (printf "%s/" $config) $v.hsm.pinFile) -}}
{{- fail (printf "hsm.pinFile (%s) must be a file inside hsm.configHostPath (%s): only that folder is mounted into the plugin" $v.hsm.pinFile $v.hsm.configHostPath) -}}
{{- end -}}
{{- range $name, $_ := $v.hsm.env -}}
{{- if regexMatch "(?i)(^|_)PIN($|_)" $name -}}
{{- fail (printf "hsm.env.%s: a PIN must never be an environment variable (pod specs show their values); write it to hsm.pinFile on the node" $name) -}}
{{- end -}}
{{- if has $name (list "KEYWARD_PKCS11_MODULE" "KEYWARD_TOKEN_LABEL" "KEYWARD_PIN_FILE" "KEYWARD_STORE_LOCK") -}}
{{- fail (printf "hsm.env.%s is set by the chart: use hsm.modulePath, hsm.tokenLabel or hsm.pinFile instead" $name) -}}
{{- end -}}
{{- end -}}
{{- if and $v.operator.enabled (eq $v.operator.hsmAccess "network") (not $v.operator.pinSecret.name) -}}
{{- fail "operator.pinSecret.name is required when operator.hsmAccess is network: name a Secret in the release namespace that holds the HSM PIN (key operator.pinSecret.key)" -}}
{{- end -}}
{{- end }}
